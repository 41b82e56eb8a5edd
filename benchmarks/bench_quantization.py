"""Parameter memory, peak memory, speed and quality of Harmon loaded in each precision and quantization setting, side
by side on the CPU.

    python benchmarks/bench_quantization.py                                   # the bundled Harmon-Shapes
    python benchmarks/bench_quantization.py --config 0.5b --size 256 --rounds 8 --steps 20 --repeats 2
    python benchmarks/bench_quantization.py --model path/to/harmon-0.5b --settings float32,int8-dynamic

Every setting loads the model through `from_pretrained` (`dtype=`, or torchao's int8 schemes through
`quantization_config=`, which leave the VAE as it is) in a process of its own, so that each peak memory is its own.
`--config` saves a model with random weights first (as benchmarks/bench_generate.py builds it) and loads that. The
inputs are synthetic and the same in every setting: random prompt tokens and a fixed gradient image. Quality is
measured against the first setting: the logits of the answer's first token, the greedy answer's tokens, and the image
generated from the same seed. Each time is the fastest of `--repeats` runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from bench_generate import build_model, machine_description, peak_memory_gb

from harmon_hf import BUNDLED_MODEL, HarmonConfig, HarmonForConditionalGeneration


# name -> (dtype the model loads in, torchao scheme quantizing its linear layers, or None)
SETTINGS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "int8-weight-only": ("float32", "Int8WeightOnlyConfig"),
    "int8-dynamic": ("float32", "Int8DynamicActivationInt8WeightConfig"),
}


def load_model(folder: str, setting: str) -> HarmonForConditionalGeneration:
    dtype, scheme = SETTINGS[setting]
    quantization = {}
    if scheme is not None:  # torchao is the `quantization` extra: only these settings need it
        import torchao.quantization
        from transformers import TorchAoConfig

        quantization["quantization_config"] = TorchAoConfig(getattr(torchao.quantization, scheme)())
    return HarmonForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype), **quantization).eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters hold as stored, tied ones once: a torchao weight counts its int8 data and scales, where
    `get_memory_footprint` counts it at the size of the float dtype it stands for."""

    def stored(tensor: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(tensor):
            return sum(stored(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        return tensor.nbytes

    return sum(stored(parameter) for parameter in model.parameters())


def synthetic_inputs(model: HarmonForConditionalGeneration, args) -> dict:
    """The same inputs in every setting: prompts for generation (conditional and unconditional rows) and a question
    (prompt tokens around the image placeholders) about a gradient image."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    vocab = min(config.text_config.vocab_size, 150000)

    def prompt_tokens(*shape):
        tokens = torch.randint(0, vocab, shape, generator=generator)
        return tokens.masked_fill(tokens == config.image_token_id, 0)

    size = args.understanding_size
    num_placeholders = (size // config.vae_stride) ** 2 + config.buffer_size
    placeholders = torch.full((1, num_placeholders), config.image_token_id)
    question = torch.cat([prompt_tokens(1, 8), placeholders, prompt_tokens(1, args.prompt_length)], dim=1)
    ramp = torch.linspace(-1, 1, size)
    pixel_values = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                                (ramp[None, :] * ramp[:, None])])[None]
    prompts = prompt_tokens(2, args.prompt_length)
    return {
        "generation": {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)},
        "question": {"input_ids": question, "attention_mask": torch.ones_like(question), "pixel_values": pixel_values},
    }


def fastest(run, repeats: int):
    """The shortest time of `repeats` runs and the last run's result. The first run pays for kernel selection (and
    oneDNN's JIT compilation in bfloat16), which a process that answers or generates many times pays once; other
    processes on the machine slow some runs down, never speed one up."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return min(seconds), result


def measure(args, setting: str, outputs_file: Path) -> dict:
    """In this process: load in `setting`, time an answer and an image (each the fastest of `args.repeats`); the
    logits of the answer's first token, the answer's tokens and the image go to `outputs_file`."""
    model = load_model(args.folder, setting)
    inputs = synthetic_inputs(model, args)
    question = inputs["question"]

    def answer():
        return model.generate(**question, max_new_tokens=args.answer_tokens, min_new_tokens=args.answer_tokens,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)

    def generate():
        return model.generate_images(**inputs["generation"], height=args.size, width=args.size, num_iter=args.rounds,
                                     guidance_scale=3.0, num_inference_steps=args.steps,
                                     generator=torch.Generator().manual_seed(0))

    seconds_per_answer, answered = fastest(answer, args.repeats)
    seconds_per_image, pixels = fastest(generate, args.repeats)
    image = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    save_file({"logits": answered.logits[0][0].float(), "image": image,
               "answer": answered.sequences[0, question["input_ids"].shape[1]:].contiguous()}, outputs_file)
    return {
        "setting": setting,
        "finite_logits": bool(torch.isfinite(answered.logits[0]).all()),
        "finite_image": bool(torch.isfinite(pixels).all()),
        "parameter_gb": parameter_bytes(model) / 1e9,
        "peak_rss_gb": peak_memory_gb(torch.device("cpu")),
        "seconds_per_image": seconds_per_image,
        "seconds_per_answer": seconds_per_answer,
    }


def compare(result: dict, outputs: dict, baseline: dict) -> dict:
    """The quality columns of one setting: its outputs against the baseline setting's."""
    logits_difference = (outputs["logits"] - baseline["logits"]).abs().max().item()
    pixel_difference = (outputs["image"].int() - baseline["image"].int()).abs()
    return {
        "logits": f"{logits_difference:.3g} ({logits_difference / baseline['logits'].abs().max().item():.1%})"
                  if result["finite_logits"] else "non-finite",
        "answer": f"{int((outputs['answer'] == baseline['answer']).sum())}/{len(baseline['answer'])}",
        "image": "non-finite pixels" if not result["finite_image"] else "identical" if not pixel_difference.any()
                 else f"{pixel_difference.float().mean().item():.2f} mean, {pixel_difference.max().item()} max",
    }


def print_table(args, results: list[dict], quality: list[dict], load_average: float):
    baseline = results[0]["setting"]
    model = args.model or (f"{args.config} with random weights" if args.config else "Harmon-Shapes (bundled)")
    print(f"Harmon {model}; one image {args.size} px, K={args.rounds}, {args.steps} diffusion steps, cfg 3.0; one "
          f"answer of {args.answer_tokens} tokens about a {args.understanding_size} px image (each the fastest of "
          f"{args.repeats} runs); on {machine_description(torch.device('cpu'))}; load average {load_average:.1f} when "
          "it started")
    print("| setting | parameters, GB | peak RSS, GB | s / image | s / answer | first answer token's logits, max abs "
          f"diff vs {baseline} | answer tokens equal | image vs {baseline} (pixel levels of 255) |")
    print("|---|---|---|---|---|---|---|---|")
    for result, delta in zip(results, quality):
        print(f"| {result['setting']} | {result['parameter_gb']:.3g} | {result['peak_rss_gb']:.2f} | "
              f"{result['seconds_per_image']:.3g} | {result['seconds_per_answer']:.3g} | {delta['logits']} | "
              f"{delta['answer']} | {delta['image']} |")


def setting_arguments(args) -> list[str]:
    """The command line of `args` for one setting's process, on the folder to load."""
    return ["--folder", args.folder, "--size", str(args.size), "--rounds", str(args.rounds), "--steps",
            str(args.steps), "--prompt-length", str(args.prompt_length), "--understanding-size",
            str(args.understanding_size), "--answer-tokens", str(args.answer_tokens), "--repeats", str(args.repeats)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model folder or Hub id (default: the bundled Harmon-Shapes)")
    source.add_argument("--config", help="release preset with random weights instead (0.5b, 1.5b)")
    source.add_argument("--folder", help=argparse.SUPPRESS)  # what one setting's process loads
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, the first is the quality baseline ({','.join(SETTINGS)})")
    parser.add_argument("--size", type=int, help="generated image side in pixels (default: the model's)")
    parser.add_argument("--rounds", type=int, default=8, help="masked-autoregressive rounds K (8)")
    parser.add_argument("--steps", type=int, default=20, help="diffusion steps per round (20)")
    parser.add_argument("--prompt-length", type=int, default=24, help="prompt tokens (24)")
    parser.add_argument("--understanding-size", type=int, help="side of the image asked about (default: --size)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens of the greedy answer (16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement, the fastest kept (3)")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # with --folder: the one setting to measure
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args()

    names = args.settings.split(",")
    unknown = set(names) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}: expected some of {', '.join(SETTINGS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.setting:
        result = measure(args, args.setting, Path(args.result_json).with_suffix(".safetensors"))
        Path(args.result_json).write_text(json.dumps(result))
        return

    load_average = os.getloadavg()[0]  # other processes on the machine slow every setting down
    with tempfile.TemporaryDirectory() as work:
        if args.config:
            build_model(argparse.Namespace(model=None, config=args.config, dtype="float32")).save_pretrained(work)
            args.folder = work
        else:
            args.folder = args.model or str(BUNDLED_MODEL)
        config = HarmonConfig.from_pretrained(args.folder)
        args.size = args.size or config.image_size
        args.understanding_size = args.understanding_size or args.size
        results, outputs = [], []
        for name in names:
            result_json = Path(work) / f"{name}.json"
            subprocess.run([sys.executable, __file__, *setting_arguments(args), "--setting", name, "--result-json",
                            str(result_json)], check=True)
            results.append(json.loads(result_json.read_text()))
            outputs.append(load_file(result_json.with_suffix(".safetensors")))
    quality = [compare(result, output, outputs[0]) for result, output in zip(results, outputs)]
    print_table(args, results, quality, load_average)


if __name__ == "__main__":
    main()
