"""Training-step throughput (samples per second) and peak memory, on a synthetic batch holding all three tasks.

    python benchmarks/bench_train.py --model path/to/tiny-model --size 64 --batch 4
    python benchmarks/bench_train.py --config 0.5b --size 256 --batch 8 --device cuda --dtype bfloat16 [--checkpointing]

Each step: text-to-image, image-to-text and text losses on `--batch` samples each, backward, AdamW update.
"""

import argparse
import resource
import time

import torch

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.convert import release_config


def synthetic_batches(config, size: int, batch: int, device, generator) -> dict:
    vocab = min(config.text_config.vocab_size, 150000) - 1
    image_tokens = (size // config.vae_stride) ** 2 + config.buffer_size

    def ids(length):
        return torch.randint(0, vocab, (batch, length), generator=generator).to(device)

    pixels = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)
    understanding_ids = torch.cat([ids(4), torch.full((batch, image_tokens), config.image_token_id, device=device),
                                   ids(32)], dim=1)
    text_ids = ids(64)
    return {
        "text_to_image": {"input_ids": ids(24), "attention_mask": torch.ones(batch, 24, dtype=torch.long, device=device),
                          "pixel_values": pixels},
        "image_to_text": {"input_ids": understanding_ids, "attention_mask": torch.ones_like(understanding_ids),
                          "pixel_values": pixels, "labels": understanding_ids.masked_fill(
                              understanding_ids == config.image_token_id, -100)},
        "text": {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids), "labels": text_ids},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", help="release preset with random weights (0.5b, 1.5b)")
    parser.add_argument("--model", help="a model folder instead of random weights")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="samples per task and step (4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model:
        model = HarmonForConditionalGeneration.from_pretrained(args.model)
    else:
        model = HarmonForConditionalGeneration(release_config(args.config))
    model = model.to(device, getattr(torch, args.dtype)).train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
    batches = synthetic_batches(model.config, args.size, args.batch, device, torch.Generator().manual_seed(0))

    def step():
        loss = model(task_batches=batches).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    samples = 3 * args.batch
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    print(f"Harmon {args.model or args.config}, {args.size} px, {args.batch} samples per task ({samples} per step), "
          f"{args.dtype} on {device}, gradient checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"{seconds:.3f} s per step, {samples / seconds:.2f} samples/s, peak memory {memory:.2f} GB")


if __name__ == "__main__":
    main()
