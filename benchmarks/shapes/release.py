"""Ship a Harmon-Shapes run: copy its final model into the package as the bundled model, with a model card made
from the run's own evaluation files.   python benchmarks/shapes/release.py RUN_FOLDER [--force]

A run whose final model is below the targets (ShapesEval generation and understanding overall >= 0.90, on at least
200 samples) is refused unless forced.
"""

import argparse
import json
import shutil
from pathlib import Path

from harmon_hf.bundled_model import BUNDLED_MODEL
from harmon_hf.shapes.build import SHAPES_TEXT_CONFIG
from harmon_hf.shapes.cases import GENERATION_CATEGORIES
from harmon_hf.shapes.world import CELLS, DEFAULT_REGION, HELD_OUT, IMAGE_SIZE, QUESTION_TYPES


MAX_BUNDLED_BYTES = 25 * 2**20
TARGET_SCORE = 0.90  # generation and understanding overall, each
MIN_SAMPLES = 200


# The run's evaluation files, by the name the bundled model's `shapes_eval.json` gives them, and their row titles.
EVALUATIONS = {
    "stage1": ("eval-stage1.json", "after stage I"),
    "stage2": ("eval-stage2.json", "after stage II"),
    "final": ("eval-stage3.json", "final (stage III), default sampler"),
    "final_dpm_solver": ("eval-stage3-dpm-solver.json", "final, DPM-Solver++ 20 steps"),
}
EVALUATION_FILE = "shapes_eval.json"


def collect_results(run: Path) -> dict:
    results = {name: json.loads((run / file).read_text()) for name, (file, _) in EVALUATIONS.items()}
    results["training_minutes"] = round(int((run / "training-seconds").read_text()) / 60, 1)
    results["training_cpu"] = (run / "cpu").read_text().strip()
    return results


def _row(name: str, results: dict) -> str:
    generation, understanding = results["generation"], results["understanding"]
    cells = [f"{generation[c]:.3f}" for c in GENERATION_CATEGORIES] + [f"**{generation['overall']:.3f}**"]
    cells += [f"{understanding[t]:.3f}" for t in QUESTION_TYPES] + [f"**{understanding['overall']:.3f}**"]
    return f"| {name} | " + " | ".join(cells) + f" | {results['seconds_per_image']:.3f} |"


def results_table(results: dict) -> str:
    header = (["model"] + [f"gen: {c}" for c in GENERATION_CATEGORIES] + ["gen: overall"]
              + [f"und: {t}" for t in QUESTION_TYPES] + ["und: overall", "s / image"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(title, results[name]) for name, (_, title) in EVALUATIONS.items()]
    return "\n".join(lines)


def model_card(results: dict) -> str:
    held_out = ", ".join(" ".join(map(str, c[1:])) for c in sorted(HELD_OUT))
    return f"""---
library_name: transformers
pipeline_tag: any-to-any
tags: [harmon, mar, synthetic]
---
# Harmon-Shapes

A small Harmon (a Qwen2 LLM of {SHAPES_TEXT_CONFIG['num_hidden_layers']} layers and \
{SHAPES_TEXT_CONFIG['num_attention_heads']} attention heads, MAR encoder and decoder, a diffusion head, and an 8-channel
autoencoder at 1/8 of the image side) trained from scratch by harmon-hf's own recipes on the synthetic shapes world,
at {IMAGE_SIZE} px. It draws and answers questions about one to three circles, squares and triangles in six colours, on
a grid of {CELLS} x {CELLS} cells where a caption settles the layout (a single object whose place is unsaid is in the
{DEFAULT_REGION}). It ships inside the `harmon-hf` package as its default model, so that generating and asking work
with no download.

## How it was made
`bash training/recipes/shapes/build.sh` ({results['training_minutes']} minutes of training on a 2-core CPU,
{results['training_cpu']}):
`harmon shapes init` (autoencoder and tokenizer), `harmon train shapes/stage0_language` (the LLM learns the
world's captions, text-only conversations, and the image's questions answered from the scene given as one token per
cell, standing in for the pretrained, instruction-tuned Qwen2.5), then the
paper's three stages `shapes/stage1` (LLM frozen, image-to-text : text-to-image = 1 : 2), `shapes/stage2`
(everything, text : image-to-text : text-to-image = 1 : 3 : 8) and `shapes/stage3` (a fifth of the learning rates,
1 : 3 : 16). Training never sees these held-out combinations (single object, count, or pair of objects): {held_out}.

## ShapesEval (held-out combinations, {results['final']['samples']} samples each)
`harmon eval shapes --model MODEL` (`--scheduler dpm-solver` for the few-step line); the scores are also in
`{EVALUATION_FILE}`.

{results_table(results)}
"""


def check_targets(final: dict):
    """Raise a ValueError naming what falls short when the final evaluation is below the targets."""
    shortfalls = [f"{task} {final[task]['overall']:.3f} < {TARGET_SCORE}" for task in ("generation", "understanding")
                  if final[task]["overall"] < TARGET_SCORE]
    if final["samples"] < MIN_SAMPLES:
        shortfalls.append(f"{final['samples']} samples < {MIN_SAMPLES}")
    if shortfalls:
        raise ValueError(f"the final model is below the targets ({'; '.join(shortfalls)}); pass force=True "
                         "(--force) to bundle it anyway")


def release(run: Path, destination: Path = BUNDLED_MODEL, force: bool = False) -> Path:
    """Copy the run's final model to `destination` (the package's bundled model) with its card and scores."""
    final = run / "stage3" / "final"
    results = collect_results(run)
    if not force:
        check_targets(results["final"])
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(final, destination, ignore=shutil.ignore_patterns("training_args.bin"))
    (destination / EVALUATION_FILE).write_text(json.dumps(results, indent=2) + "\n")
    (destination / "README.md").write_text(model_card(results))
    size = sum(f.stat().st_size for f in destination.iterdir())
    if size > MAX_BUNDLED_BYTES:
        shutil.rmtree(destination)
        raise ValueError(f"the model is {size / 2**20:.1f} MB, over the {MAX_BUNDLED_BYTES / 2**20:.0f} MB limit")
    print(f"bundled {final} in {destination} ({size / 2**20:.1f} MB)")
    return destination


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Bundle a Harmon-Shapes run as the package's default model.")
    parser.add_argument("run", nargs="?", default="runs/harmon-shapes", type=Path)
    parser.add_argument("--force", action="store_true", help="bundle the run even if it is below the targets")
    args = parser.parse_args()
    try:
        release(args.run, force=args.force)
    except ValueError as error:
        parser.exit(1, f"error: {error}\n")
