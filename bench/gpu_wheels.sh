#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that reaches no package index: the packages the bench scripts
# import that its image lacks (it has torch, numpy, scipy, scikit-learn, scikit-image, pyyaml, tqdm, psutil,
# huggingface-hub, safetensors, ...), at this venv's versions, for its Python (3.12, x86-64 manylinux).
#
#     bash bench/gpu_wheels.sh [DIR]        # default DIR: build/gpu-wheels (git ignores build/)
#
# Env: PYTHON (the pip to download with; default .venv/bin/python), GPU_PYTHON (the target's Python, 3.12).
# Run it here, where PyPI is reachable; then carry DIR to the GPU machine with the tree.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/build/gpu-wheels}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}

# diffusers (models), pydantic (configs), zarr and dask/distributed (the dump imports them), their needs the
# image lacks, and setuptools (builds aselect there from the tree)
PACKAGES=(diffusers importlib-metadata lazy-importer
          pydantic pydantic-core annotated-types typing-inspection typing-extensions
          zarr numcodecs google-crc32c donfig
          dask distributed partd locket zict tblib tornado
          setuptools)

# name==version as installed in this venv, so the GPU runs what the CPU runs
mapfile -t PINS < <("$PYTHON" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")
EOF
)

# pip matches manylinux_2_N tags exactly: name the ones these packages ship
PLATFORMS=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf "$DIR"
mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${PINS[@]}"
ls -1 "$DIR"
echo "$(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
