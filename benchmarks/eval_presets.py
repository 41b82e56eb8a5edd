"""ShapesEval of sampling presets, and of their techniques one at a time, side by side on one model.

    python benchmarks/eval_presets.py --presets reference,fast,fastest --seeds 0,1,2
    python benchmarks/eval_presets.py --presets fast:bfloat16,fast:fewer-rounds,fast:step-annealing,fast:guidance-reuse

Default model: Harmon-Shapes, the bundled model. Each preset runs ShapesEval (its 200 held-out samples for
generation and for understanding) for each seed; the table gives the generation score per seed and its change from
the first preset's, and the understanding score (which the sampling preset does not touch: answering does not sample
images). `harmon eval shapes --preset P` scores a single named preset.
"""

import argparse

from presets import preset_named

from harmon_hf import HarmonPipeline
from harmon_hf.shapes.evaluate import shapes_eval


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: the bundled Harmon-Shapes)")
    parser.add_argument("--presets", default="reference,fast,fastest", help="comma-separated presets (see presets.py)")
    parser.add_argument("--seeds", default="0", help="comma-separated ShapesEval seeds (0)")
    parser.add_argument("--n", type=int, default=200, help="samples per half (200)")
    args = parser.parse_args()

    names, seeds = args.presets.split(","), [int(seed) for seed in args.seeds.split(",")]
    presets = {name: preset_named(name) for name in names}
    pipeline = HarmonPipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    results = {name: [shapes_eval(pipeline, args.n, seed, preset=preset) for seed in seeds]
               for name, preset in presets.items()}

    baseline = [result["generation"]["overall"] for result in results[names[0]]]
    print(f"ShapesEval ({args.n} samples per half) of {args.model or 'Harmon-Shapes (bundled)'}, seeds {seeds}")
    print(f"| preset | generation per seed | change from {names[0]} | understanding per seed | seconds per image |")
    print("|---|---|---|---|---|")
    for name in names:
        generation = [result["generation"]["overall"] for result in results[name]]
        change = [score - base for score, base in zip(generation, baseline)]
        understanding = [result["understanding"]["overall"] for result in results[name]]
        seconds = sum(result["seconds_per_image"] for result in results[name]) / len(seeds)
        print(f"| {name} | {' / '.join(f'{score:.3f}' for score in generation)} | "
              f"{' / '.join(f'{delta:+.3f}' for delta in change)} | {' / '.join(f'{score:.3f}' for score in understanding)} | "
              f"{seconds:.3f} |")


if __name__ == "__main__":
    main()
