#!/usr/bin/env bash
# Harmon-Shapes from nothing, on a CPU: the autoencoder and tokenizer, language pre-training, the paper's three
# stages, ShapesEval after stage I, stage II and stage III, then the model copied into the package with its card.
#   bash training/recipes/shapes/build.sh [RUN_FOLDER]      (default runs/harmon-shapes)
set -euo pipefail
RUN=${1:-runs/harmon-shapes}
mkdir -p "$RUN"
START=$(date +%s)

harmon shapes init --output "$RUN/init"
harmon train shapes/stage0_language model="$RUN/init" output_dir="$RUN/stage0"
harmon train shapes/stage1 model="$RUN/stage0/final" output_dir="$RUN/stage1"
harmon train shapes/stage2 model="$RUN/stage1/final" output_dir="$RUN/stage2"
harmon train shapes/stage3 model="$RUN/stage2/final" output_dir="$RUN/stage3"
echo "$(( $(date +%s) - START ))" > "$RUN/training-seconds"
# The time depends on the processor (the same recipe took 41 minutes on an AVX-512 Xeon, and each step 1.5 to 1.7
# times as long on an AVX2 EPYC, both with two cores), so the run records which it had.
echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability(), "with", torch.get_num_threads(), "threads")')" > "$RUN/cpu"
echo "training took $(cat "$RUN/training-seconds") s"

for STAGE in stage1 stage2 stage3; do
  harmon eval shapes --model "$RUN/$STAGE/final" --json "$RUN/eval-$STAGE.json"
done
harmon eval shapes --model "$RUN/stage3/final" --scheduler dpm-solver --json "$RUN/eval-stage3-dpm-solver.json"
# The release script copies the model into the source tree's package: it lives in the checkout, not the install.
python "$(dirname "$0")/../../../benchmarks/shapes/release.py" "$RUN"
