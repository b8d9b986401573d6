#!/usr/bin/env bash
# Every GPU figure the project reports, in one run on a GPU machine that reaches no package index:
#   sd3_scale       bench/sd3_scale.py: SD3-Medium shape, one (layer, site) pair, streamed HFR vs its dumped map
#   calibrate_scale bench/calibrate_scale.py: DiT-XL/2 calibration, stored maps vs streamed HFR (bytes, seconds)
#   dump_throughput bench/dump_throughput.py --variant DiT-XL/2 --latent: the dump's rate vs the bare forward
#                   pass (docs/operations.md, GPUs)
# Each step has a time limit (and all of them BUDGET seconds together); its output goes to $OUT/<step>.log and
# its JSON line to $OUT/<step>.json, OUT defaulting to bench-out. A failed step does not stop the next ones;
# the exit status is 1 if any failed.
#
# Wheels: the machine's Python has torch, numpy, scikit-learn, scikit-image, pyyaml, ... but not diffusers,
# pydantic, zarr or dask. Prepare them here, where PyPI is reachable (build/ is git-ignored):
#     bash bench/gpu_wheels.sh                 # -> build/gpu-wheels, ~22 MB
# then send them with the tree (device tool: carry ["build/gpu-wheels"]) and run
#     bash bench/gpu_check.sh                  # on the GPU machine
#     bash bench/gpu_check.sh --dry-run        # here: the same steps at toy sizes on the CPU, with .venv
# The wheels go to a temporary --target directory on PYTHONPATH (nothing is installed into the machine's Python),
# and aselect is built there from the tree with the carried setuptools; the bench scripts run from a copy of
# bench/ so the tree's bare aselect/ folder does not shadow the installed package.
# Env: OUT, WHEELS (default build/gpu-wheels), PYTHON (default python3; --dry-run: .venv/bin/python), BUDGET
# (default 540 s, to end inside a 600 s device call), DIT_IMAGES (dump_throughput images, default 1024),
# SD3_IMAGES (default 8).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
if [[ ${1:-} == --dry-run ]]; then
    DRY=1
elif [[ $# -gt 0 ]]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
    exit 2
fi
START=$SECONDS
BUDGET=${BUDGET:-540}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHEELS=${WHEELS:-$ROOT/build/gpu-wheels}
if ((DRY)); then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aselect-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    if ((DRY)); then nvidia-smi -L 2>/dev/null || echo "no GPU (dry run)"; else nvidia-smi -L; fi
} | tee "$OUT/env.txt"

# 1. Packages: the carried wheels (not on a dry run: .venv has them, for its own Python), then aselect itself
SITE=$WORK/site
mkdir -p "$SITE"
if ((!DRY)); then
    mapfile -t wheels < <(find "$WHEELS" -maxdepth 1 -name '*.whl' ! -name 'setuptools-*')
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $WHEELS: run bench/gpu_wheels.sh where PyPI is reachable and carry the folder" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
fi
# a copy of the tree to build from, so the build leaves nothing in it
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./bench-out -cf - . \
    | tar -C "$WORK" --one-top-level=src -xf -
"$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$WORK/src"
mkdir -p "$WORK/run"
cp -r "$ROOT/bench" "$WORK/run/bench"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
(cd "$WORK/run" && SITE=$SITE "$PYTHON" -) <<'EOF' | tee -a "$OUT/env.txt"
import os
import platform

import diffusers
import pydantic
import torch
import zarr

import aselect.pipelines.dump  # noqa: F401  the dump's imports: zarr, dask, distributed
from aselect.pipelines import models

cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA"
assert models.__file__.startswith(os.environ["SITE"]), f"aselect imported from {models.__file__}, not the build"
print(f"python {platform.python_version()}, torch {torch.__version__} ({cuda}), diffusers {diffusers.__version__}, "
      f"pydantic {pydantic.__version__}, zarr {zarr.__version__}; aselect from {models.__file__}")
EOF

# 2. The figures: step NAME LIMIT_SECONDS SCRIPT ARGS...; the limit shrinks to what is left of BUDGET
FAILED=()
step() {
    local name=$1 limit=$2 script=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 5))
    ((limit < left)) || limit=$left
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
        FAILED+=("$name")
        return
    fi
    echo "== $name (limit ${limit}s): $script $*"
    local rc=0 began=$SECONDS
    (cd "$WORK/run" && timeout --kill-after=10 "$limit" "$PYTHON" "bench/$script" "$@") 2>&1 \
        | tee "$OUT/$name.log" || rc=$?
    if [[ ! -s $OUT/$name.json ]]; then  # scripts without --json: their last line is the JSON summary
        tail -n 1 "$OUT/$name.log" | grep '^{' >"$OUT/$name.json" || rm -f "$OUT/$name.json"
    fi
    echo "== $name: exit $rc after $((SECONDS - began))s"
    ((rc == 0)) || FAILED+=("$name")
}

if ((DRY)); then
    step sd3_scale 300 sd3_scale.py --device cpu --variant MMDiT-T/2 --image-size 128 --layer 3 --images 1 \
        --json "$OUT/sd3_scale.json"
    step calibrate_scale 300 calibrate_scale.py --device cpu --variant DiT-XS/2 --vae small --images 2 \
        --timesteps 100
    step dump_throughput 300 dump_throughput.py --device cpu --variant DiT-XS/2 --latent --image-size 64 \
        --images 4 --timesteps 0,100 --chunk 2
else
    step sd3_scale 240 sd3_scale.py --device cuda --images "${SD3_IMAGES:-8}" --json "$OUT/sd3_scale.json"
    step calibrate_scale 90 calibrate_scale.py --device cuda --images 32 --timesteps 100,500
    step dump_throughput 240 dump_throughput.py --device cuda --variant DiT-XL/2 --latent \
        --images "${DIT_IMAGES:-1024}" --timesteps 0,100,200,300,400,500,600,700,800,900 --chunk 128
fi

echo "== done in $((SECONDS - START))s; outputs in $OUT: $(cd "$OUT" && echo *)"
if ((${#FAILED[@]})); then
    echo "== failed: ${FAILED[*]}"
    exit 1
fi
