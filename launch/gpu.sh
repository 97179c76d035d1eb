#!/usr/bin/env bash
# Train fva_jax on one machine with NVIDIA GPUs (all visible GPUs form the "data" mesh axis;
# the global batch must be divisible by their number).
#
# Usage (from the repository root):
#   launch/gpu.sh install                                   # venv in ./.venv-gpu, JAX for CUDA 13
#   launch/gpu.sh train configs/breakfast.py /runs/breakfast --config.data.manual_dir=/data/breakfast
#   launch/gpu.sh eval  configs/breakfast.py /runs/breakfast
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh train configs/demo.py /tmp/fva_demo
#
# Needs an NVIDIA driver recent enough for CUDA 13; the CUDA libraries come from pip.
# Restarting the same train command resumes from WORKDIR/checkpoints.
set -euo pipefail

VENV="${VENV:-.venv-gpu}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
PYTHON="${PYTHON:-python3.11}"

usage() { sed -n '2,13p' "$0"; exit 1; }

cmd="${1:-}"; shift || true
case "$cmd" in
  install)
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --upgrade pip
    "$VENV/bin/pip" install -r requirements.txt "jax[cuda13]==$JAX_VERSION"
    "$VENV/bin/pip" install --no-deps -e .
    "$VENV/bin/python" -c 'import jax; print(jax.devices())'
    ;;
  train|eval|prepare)
    [[ $# -ge 2 ]] || usage
    config="$1" workdir="$2"; shift 2
    # Training imports no TensorFlow; building a missing data set may (TFDS's writer), and
    # the tensorflow-cpu of requirements.txt sees no GPU. TF_CPP_MIN_LOG_LEVEL quiets its logs.
    exec env TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -m fva_jax.main --mode="$cmd" \
      --config="$config" --workdir="$workdir" "$@"
    ;;
  *) usage ;;
esac
