"""Seconds per image, per phase, and peak memory of Harmon's text-to-image generation, for one sampling preset or
several side by side.

    python benchmarks/bench_generate.py --config 0.5b --size 256 --rounds 64 --steps 100 --presets reference,fast,fastest
    python benchmarks/bench_generate.py --model path/to/harmon-0.5b --device cuda --dtype bfloat16 --preset fast

`--config` builds the model with random weights (the timing does not depend on them); `--model` loads a folder or
Hub id. One image with classifier-free guidance (its unconditional copy included), as the reference measures it.
With `--presets`, each preset runs in a process of its own, one after the other, so that each peak memory is its own;
the table gives each preset's images per second as a multiple of the first preset's.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from presets import preset_named

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.convert import release_config
from harmon_hf.modeling.modeling_harmon import computes_bfloat16_natively


PHASES = ["prompt prefill", "MAR encoder", "LLM", "MAR decoder", "diffusion head", "VAE decode"]
CPU_FLAGS = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]


class PhaseTimer:
    """Accumulates wall time of wrapped methods; the first LLM call of a generation is the prompt prefill."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)

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
            return result

        setattr(owner, method_name, timed)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return (f"{model} (flags: {', '.join(present) or 'none of ' + ', '.join(CPU_FLAGS)}), {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}")


def build_model(args) -> HarmonForConditionalGeneration:
    if args.model:
        return HarmonForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    model = HarmonForConditionalGeneration(release_config(args.config))
    return model.to(getattr(torch, args.dtype))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def time_preset(args, preset_name: str) -> dict:
    """Generates with one preset in this process: seconds per phase and in total, peak memory, the dtype used."""
    device = torch.device(args.device)
    preset = preset_named(preset_name)
    model = build_model(args).to(device).eval()
    inner = model.model
    timer = PhaseTimer(device)
    llm_calls = {"count": 0}

    def llm_phase():
        llm_calls["count"] += 1
        return "prompt prefill" if llm_calls["count"] == 1 else "LLM"

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

    def generate(seed: int):
        model.generate_images(input_ids, attention_mask, height=args.size, width=args.size, num_iter=args.rounds,
                              guidance_scale=args.guidance, num_inference_steps=args.steps, preset=preset,
                              generator=torch.Generator().manual_seed(seed))

    # Warm-up generations are not timed: the first sight of each matrix shape costs kernel selection (and JIT
    # compilation in oneDNN's bfloat16 path, or by torch.compile), which a process that generates many images
    # pays once.
    for seed in range(args.warmup):
        generate(seed)
    timer.seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for seed in range(args.repeats):
        llm_calls["count"] = 0
        generate(seed)
    timer.synchronize()
    total = (time.perf_counter() - start) / args.repeats
    bfloat16 = preset.bfloat16 and computes_bfloat16_natively(device)
    return {
        "preset": preset_name,
        "phases": {phase: timer.seconds[phase] / args.repeats for phase in PHASES},
        "total": total,
        "peak_memory_gb": peak_memory_gb(device),
        "numerics": f"{args.dtype} weights" + (", bfloat16 autocast" if bfloat16 else ""),
    }


def print_table(args, results: list[dict]):
    device = torch.device(args.device)
    print(f"Harmon {args.model or args.config} ({'loaded' if args.model else 'random weights'}), {args.size} px, "
          f"K={args.rounds}, {args.steps} diffusion steps, cfg {args.guidance}, one image (after {args.warmup} "
          f"untimed), on {device}: "
          f"{machine_description(device)}")
    print("| phase (seconds) | " + " | ".join(result["preset"] for result in results) + " |")
    print("|---|" + "---|" * len(results))
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{result['phases'][phase]:.1f}" for result in results) + " |")
    other = [result["total"] - sum(result["phases"].values()) for result in results]
    print("| other (masks, orders, bookkeeping) | " + " | ".join(f"{seconds:.1f}" for seconds in other) + " |")
    print("| **total per image** | " + " | ".join(f"**{result['total']:.1f}**" for result in results) + " |")
    baseline = results[0]["total"]
    print(f"| images per second vs {results[0]['preset']} | "
          + " | ".join(f"{baseline / result['total']:.2f}x" for result in results) + " |")
    where = "allocated on the GPU" if device.type == "cuda" else "resident, whole process"
    print(f"| peak memory, GB ({where}) | " + " | ".join(f"{result['peak_memory_gb']:.2f}" for result in results)
          + " |")
    print("| numerics | " + " | ".join(result["numerics"] for result in results) + " |")


def settings_arguments(args) -> list[str]:
    """The command line of `args` without the preset choice, for one preset's process."""
    arguments = ["--config", args.config, "--size", str(args.size), "--rounds", str(args.rounds), "--steps",
                 str(args.steps), "--guidance", str(args.guidance), "--prompt-length", str(args.prompt_length),
                 "--device", args.device, "--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats",
                 str(args.repeats)]
    if args.model:
        arguments += ["--model", args.model]
    return arguments + (["--compile"] if args.compile else [])


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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the LLM")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations first (1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generations, averaged (1)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--preset", default="reference", help="sampling preset to time (reference; see presets.py)")
    choice.add_argument("--presets", help="comma-separated presets to time side by side, e.g. reference,fast,fastest "
                                          "or reference,fast:bfloat16 (one technique of a preset alone)")
    parser.add_argument("--result-json", help=argparse.SUPPRESS)  # how a --presets run collects one preset's result
    args = parser.parse_args()

    names = args.presets.split(",") if args.presets else [args.preset]
    for name in names:
        preset_named(name)  # an unknown name fails here, before minutes of work
    if not args.presets:
        result = time_preset(args, args.preset)
        if args.result_json:
            Path(args.result_json).write_text(json.dumps(result))
            return
        print_table(args, [result])
        return

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            output = Path(folder) / f"{name}.json"
            subprocess.run([sys.executable, __file__, *settings_arguments(args), "--preset", name,
                            "--result-json", str(output)], check=True)
            results.append(json.loads(output.read_text()))
    print_table(args, results)


if __name__ == "__main__":
    main()
