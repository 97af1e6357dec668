#!/usr/bin/env bash
# Issue 29, item 3: the candidates of the transfer study, pretrained equally long on the same pool
# (the pool of builtin:demo, docs/weights.md "Reproduce"), each in its own single-thread process.
# Usage: bash studies/transfer_pretrain.sh POOL_STORE OUT_DIR [STEPS]
set -euo pipefail
pool=$1 out=$2 steps=${3:-6000}
common=(-c pretrain_demo --data "$pool" --device cpu --seed 0 --max-steps "$steps"
        --set run.keep_last=100 --set run.checkpoint_every=1000 --set run.image_every=100000)
declare -A recipe=(
  [grid]=""                                                          # builtin:demo's recipe
  [boxes]="fusion.mode=boxes fusion.box_size_min=[2,2,2] fusion.box_size_max=[10,20,20]"  # the paper's
  [grid_adamw]="optim.name=adamw optim.weight_decay=0.01"            # decoupled weight decay
  [grid_swap]="fusion.num_classes=2"                                 # K=1: blocks swapped, nothing blended
)
for name in "${!recipe[@]}"; do
  sets=()
  for s in ${recipe[$name]}; do sets+=(--set "$s"); done
  OMP_NUM_THREADS=1 nohup nice -n 5 volumefusion pretrain "${common[@]}" "${sets[@]}" --out "$out/$name" \
    > "$out/$name.log" 2>&1 &
done
wait
