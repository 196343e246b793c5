#!/usr/bin/env bash
# Every evaluation protocol on the `make demo` checkpoint and, as the baseline, on the same network
# freshly initialised (--random-init): linear probe, memory probe, fine-tuning, retrieval + k-NN.
# Usage: scripts/demo_eval.sh [DEMO_DIR (runs/demo)] [AVIDFAST (avidfast)]. About 2 minutes on 2 cores.
# Results: DEMO_DIR/eval/<protocol>-<trained|random>/results.json and a printed table per run.
set -euo pipefail
demo=${1:-runs/demo}
avidfast=${2:-avidfast}
checkpoint=$demo/train/checkpoints/last.pt
if [ ! -f "$checkpoint" ]; then
    echo "no demo checkpoint at $checkpoint: run 'make demo' (or avidfast demo --out $demo) first" >&2
    exit 2
fi
data=(--set "data.train_manifest=$demo/data/manifest.csv" --set "data.audio.stats=$demo/data/table5-stats.npz")
out=$demo/eval
for init in trained random; do
    extra=(--overwrite)  # these folders are this script's: a rerun replaces them
    [ "$init" = random ] && extra+=(--random-init)
    "$avidfast" eval linear demo-linear "${data[@]}" --set "out_dir=$out/linear-$init" --checkpoint "$checkpoint" ${extra[@]+"${extra[@]}"}
    "$avidfast" eval memory --checkpoint "$checkpoint" --out "$out/memory-$init" ${extra[@]+"${extra[@]}"}
    "$avidfast" eval finetune demo-finetune "${data[@]}" --set "out_dir=$out/finetune-$init" --checkpoint "$checkpoint" ${extra[@]+"${extra[@]}"}
    "$avidfast" eval retrieval --checkpoint "$checkpoint" --manifest "$demo/held_out/manifest.csv" \
        --train-manifest "$demo/data/manifest.csv" --frames 4 --crop 64 --audio-stats "$demo/data/table5-stats.npz" \
        --out "$out/retrieval-$init" ${extra[@]+"${extra[@]}"}
done
