"""What each training strategy keeps in memory per process for the released configurations, computed from their
parameter counts (the models are built on the meta device: nothing is allocated or downloaded).

    python benchmarks/training_memory.py --processes 8

Float32 weights with AdamW: a trainable parameter costs 4 bytes of weight, 4 of gradient and 8 of Adam's two moments
(16 in all); a frozen one 4. DDP keeps everything whole on every process; ZeRO-2 keeps the weights whole and divides
gradients and moments between the processes; FSDP and ZeRO-3 divide all of it. Activations, and the one shard unit
that FSDP/ZeRO-3 gather at a time, come on top. (With DeepSpeed's bf16 the weights and gradients are 2 bytes each and
a float32 master copy joins the moments: 2 + 2 + 12, the same 16 bytes per trainable parameter.)
"""

import argparse

import torch

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.convert import RELEASES, release_config

WEIGHT, GRADIENT, MOMENTS = 4, 4, 8
# The paper's stages: stage I aligns the new modules with the LLM frozen; stages II and III train all but the VAE.
FROZEN = {"all but the VAE train": ("vae",), "stage I (LLM frozen)": ("vae", "language_model")}


def parameter_counts(release: str) -> dict[str, int]:
    """Parameters per Harmon module (tied embeddings counted once)."""
    with torch.device("meta"):
        model = HarmonForConditionalGeneration(release_config(release))
    return {name: sum(p.numel() for p in getattr(model.model, name).parameters())
            for name, _ in model.model.named_children()}


def bytes_per_process(trainable: int, frozen: int, processes: int) -> dict[str, float]:
    return {
        "DDP": (WEIGHT + GRADIENT + MOMENTS) * trainable + WEIGHT * frozen,
        "ZeRO-2": WEIGHT * (trainable + frozen) + (GRADIENT + MOMENTS) * trainable / processes,
        "FSDP / ZeRO-3": ((WEIGHT + GRADIENT + MOMENTS) * trainable + WEIGHT * frozen) / processes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args()
    print("| model | parameters | what trains | " + " | ".join(bytes_per_process(0, 0, 1)) + " |")
    print("|---|---|---|---|---|---|")
    for release in RELEASES:
        counts = parameter_counts(release)
        total = sum(counts.values())
        for setting, frozen_modules in FROZEN.items():
            frozen = sum(counts[name] for name in frozen_modules)
            cells = [f"{value / 1e9:.1f} GB" for value in bytes_per_process(total - frozen, frozen, args.processes).values()]
            print(f"| Harmon-{release.upper()} | {total / 1e9:.2f} B | {setting} | " + " | ".join(cells) + " |")
    print(f"\nper process, {args.processes} processes, float32 weights with AdamW, activations not included")


if __name__ == "__main__":
    main()
