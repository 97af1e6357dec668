#!/usr/bin/env bash
# Issue 29, item 3, second part (studies/README.md): the grid recipe on textured phantoms.
# Run from an empty folder that holds dev/ of the first study (split.json, recipe.yaml), or a link to it.
# Usage: bash studies/texture.sh
# (The reported run named the textured pool pool/ and pool_store/; renamed here so that the plain pool of
# docs/weights.md in the same folder is never taken for it.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
python - <<'PY'
from pathlib import Path
from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
grid = dict(shape=(32, 64, 64), spacing_zyx=(5.0, 5.6, 5.6), vary=True, texture=True)
if not Path("pool_textured/images").is_dir():
    write_phantoms("pool_textured", range(10000, 10400), **grid)
if not Path("devtex/Task01_Phantom/dataset.json").is_file():
    write_msd_dataset("devtex/Task01_Phantom", [*range(52000, 52008), *range(53000, 53008)], **grid)
PY
[ -d pool_textured_store ] || volumefusion prepare pool_textured/images \
    "$(python -c 'from volumefusion.data.samples import chest_ct; print(chest_ct()[0])')" --out pool_textured_store --spacing 5 5.6 5.6
mkdir -p runs
nohup volumefusion pretrain -c pretrain_demo --data pool_textured_store --device cpu --seed 0 --max-steps 6000 \
    --set run.stop_after=3000 --set run.keep_last=100 --set run.checkpoint_every=1000 --set run.image_every=100000 \
    --out runs/grid_textured > runs/grid_textured.log 2>&1 &
pretraining=$!
common=(--data devtex/Task01_Phantom -c dev/recipe.yaml --split dev/split.json --steps 600 --labelled 1
        --seeds 101 102 103 104 --device cpu)
ckpt=runs/grid_textured/checkpoints
until [ -f $ckpt/step_00001000.pt ]; do
  kill -0 $pretraining 2>/dev/null || { echo "pretraining ended before step 1000: runs/grid_textured.log" >&2; exit 1; }
  sleep 20
done
volumefusion probe $ckpt/step_00001000.pt "${common[@]}" --out probes/tex600 --workers 1   # beside the pretraining
wait
volumefusion probe $ckpt/step_00003000.pt "${common[@]}" --out probes/tex600 --finetune
python "$here/shortcut.py" pool_textured_store shortcut runs/grid_textured >> shortcut.jsonl
