"""Seconds per image, per phase, and peak memory of Harmon's text-to-image generation.

    python benchmarks/bench_generate.py --config 0.5b --size 256 --rounds 64 --steps 100
    python benchmarks/bench_generate.py --model path/to/harmon-0.5b --device cuda --dtype bfloat16

`--config` builds the model with random weights (the timing does not depend on them); `--model` loads a folder or
Hub id. One image with classifier-free guidance (its unconditional copy included), as the reference measures it.
"""

import argparse
import resource
import time
from collections import defaultdict

import torch

from harmon_hf import HarmonConfig, HarmonForConditionalGeneration


PHASES = ["prompt prefill", "MAR encoder", "LLM", "MAR decoder", "diffusion head", "VAE decode"]


class PhaseTimer:
    """Accumulates wall time of wrapped methods; the first LLM call of a generation is the prompt prefill."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner, method_name: str, phase):
        original = getattr(owner, method_name)

        def timed(*args, **kwargs):
            name = phase() if callable(phase) else phase
            self.synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result

        setattr(owner, method_name, timed)


def build_model(args) -> HarmonForConditionalGeneration:
    if args.model:
        return HarmonForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    config = HarmonConfig.from_release(args.config)
    model = HarmonForConditionalGeneration(config)
    return model.to(getattr(torch, args.dtype))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", help="release preset with random weights (0.5b, 1.5b)")
    parser.add_argument("--model", help="a model folder or Hub id instead of random weights")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    parser.add_argument("--rounds", type=int, default=64, help="masked-autoregressive rounds K (64)")
    parser.add_argument("--steps", type=int, default=100, help="diffusion steps per round (100)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (3.0)")
    parser.add_argument("--prompt-length", type=int, default=24, help="prompt tokens (24)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the LLM")
    parser.add_argument("--repeats", type=int, default=1, help="timed generations after one warm-up on GPU (1)")
    args = parser.parse_args()

    device = torch.device(args.device)
    load_start = time.perf_counter()
    model = build_model(args).to(device).eval()
    load_seconds = time.perf_counter() - load_start
    inner = model.model

    timer = PhaseTimer(device)
    llm_calls_in_generation = {"count": 0}

    def llm_phase():
        llm_calls_in_generation["count"] += 1
        return "prompt prefill" if llm_calls_in_generation["count"] == 1 else "LLM"

    timer.wrap(inner.language_model, "forward", llm_phase)
    timer.wrap(inner.mar_encoder, "forward", "MAR encoder")
    timer.wrap(inner.mar_decoder, "forward", "MAR decoder")
    timer.wrap(inner.diffusion_head, "sample", "diffusion head")
    timer.wrap(model, "decode_latents", "VAE decode")

    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(vocab, 150000), (2, args.prompt_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if args.compile:
        inner.language_model.forward = torch.compile(inner.language_model.forward)
    # On a GPU (or compiled) the first generation warms up kernels and is not reported.
    runs = args.repeats + (1 if device.type == "cuda" or args.compile else 0)
    for run in range(runs):
        timer.seconds.clear()
        llm_calls_in_generation["count"] = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model.generate_images(input_ids, attention_mask, height=args.size, width=args.size, num_iter=args.rounds,
                              guidance_scale=args.guidance, num_inference_steps=args.steps,
                              generator=torch.Generator().manual_seed(run))
        timer.synchronize()
        total = time.perf_counter() - start

    print(f"Harmon {args.model or args.config} ({'loaded' if args.model else 'random weights'}), {args.size} px, "
          f"K={args.rounds}, {args.steps} diffusion steps, cfg {args.guidance}, {args.dtype} on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; model ready in {load_seconds:.0f} s")
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {timer.seconds[phase]:.1f} | {100 * timer.seconds[phase] / total:.0f}% |")
    other = total - sum(timer.seconds[phase] for phase in PHASES)
    print(f"| other (masks, orders, bookkeeping) | {other:.1f} | {100 * other / total:.0f}% |")
    print(f"| **total per image** | **{total:.1f}** | |")
    print(f"peak memory: {peak_memory_gb(device):.2f} GB ({'allocated on the GPU' if device.type == 'cuda' else 'resident'})")


if __name__ == "__main__":
    main()
