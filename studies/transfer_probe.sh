#!/usr/bin/env bash
# Issue 29, item 3: score the transfer study's candidates (studies/README.md) with `volumefusion probe`,
# as their checkpoints appear. Run from the folder that holds runs/ (transfer_pretrain.sh) and dev/
# (the development phantoms: dev/Task01_Phantom, dev/split.json, dev/recipe.yaml; see README.md).
# Usage: bash studies/transfer_probe.sh [STEP ...]   (default: 1000 3000; the last also fine-tunes)
set -euo pipefail
steps=("${@:-1000 3000}")
steps=(${steps[*]})
common=(--data dev/Task01_Phantom --out probes/dev600 -c dev/recipe.yaml --split dev/split.json --steps 600
        --labelled 1 --seeds 101 102 --device cpu)
export OMP_NUM_THREADS=1
volumefusion probe builtin:demo "${common[@]}"
for step in "${steps[@]}"; do
  files=()
  for run in grid boxes grid_adamw grid_swap; do
    files+=("runs/$run/checkpoints/step_$(printf %08d "$step").pt")
  done
  for f in "${files[@]}"; do until [ -f "$f" ]; do sleep 30; done; done
  extra=()
  [ "$step" = "${steps[-1]}" ] && extra=(--finetune)
  volumefusion probe "${files[@]}" "${common[@]}" "${extra[@]}"
done
