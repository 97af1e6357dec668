#!/usr/bin/env bash
# Usage, from the folder that holds runs/: bash studies/stop_at.sh STEP
# stop each candidate's pretraining once its step-$1 checkpoint exists (SIGTERM: it writes latest.pt and exits)
step=$(printf %08d "$1")
for run in grid boxes grid_adamw grid_swap; do
  ( until [ -f "runs/$run/checkpoints/step_$step.pt" ]; do sleep 20; done
    pkill -TERM -f -- "--out $PWD/runs/$run\$" ) &
done
wait
