#!/usr/bin/env bash
# Prepare what the GPU suite carries to the GPU machine (issue 18). Run here, on the CPU machine, with the
# project installed (README: install) and a package index reachable:
#
#   benchmarks/gpu_prepare.sh [--with-torchao] [--train-images N] [--payload DIR]
#
# The GPU machine has Python 3.12, torch 2.11.0+cu130, triton 3.6.0, numpy, safetensors, huggingface-hub,
# pytest, matplotlib, tqdm, scipy, Pillow (device tool: KINDS.md) and no package registry. This script puts
# into DIR (default gpu_payload/ at the checkout's root, git-ignored):
#   wheels/  Python 3.12 manylinux wheels of what the suite needs there and the image lacks: diffusers and
#            its missing dependency importlib_metadata (the rest of diffusers' needs are in the image);
#            with --with-torchao also torchao 0.18.0 (built for torch >= 2.11), the sampling benchmark's peer
#   data/    the 500 held-out CIFAR-10 test images (test_heldout.npz) and the training set's JPEG bytes
#            (train_jpeg.npz): all 50000 images when they fit the device tool's 64 MiB beside the checkout
#            and the wheels, else a seeded subset that does (--train-images caps it)
# then prints the sizes, the command to run there, what to carry and the timeout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PAYLOAD=$ROOT/gpu_payload
PY=${PYTHON:-python3}
TORCHAO=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with-torchao) TORCHAO=1 ;;
    --train-images) EXTRA+=(--train-images "$2"); shift ;;
    --payload) PAYLOAD=$(cd "$2" 2>/dev/null && pwd || echo "$2"); shift ;;
    *) echo "usage: $0 [--with-torchao] [--train-images N] [--payload DIR]" >&2; exit 2 ;;
  esac
  shift
done

# pinned: what the rehearsal ran with; diffusers 0.42.1 needs huggingface-hub >= 1.32 (the image has 1.33.0)
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.1)
[ "$TORCHAO" = 1 ] && WHEELS+=(torchao==0.18.0)

rm -rf "$PAYLOAD/wheels" "$PAYLOAD/data"
mkdir -p "$PAYLOAD/wheels"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$PAYLOAD/wheels" "${WHEELS[@]}"
ls -l "$PAYLOAD/wheels"

# data, sizes, and the command to run there
"$PY" "$ROOT/benchmarks/gpu_suite.py" --prepare-data --payload "$PAYLOAD" ${EXTRA[@]+"${EXTRA[@]}"}
