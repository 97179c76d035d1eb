#!/usr/bin/env bash
# Train fva_jax on a Cloud TPU VM: a single host (e.g. v5litepod-8) or a pod slice with
# several hosts (e.g. v5litepod-16 = 2 hosts, v4-32 = 4 hosts). The same command runs on
# every worker; JAX joins them with jax.distributed.initialize() and each host reads its own
# slice of the data. Checkpoints, TensorBoard events and final_metrics.json go to a gs://
# workdir that every worker can write.
#
# Usage (from the repository root):
#   export TPU_NAME=fva-tpu ZONE=us-west4-a            # required
#   export ACCELERATOR_TYPE=v5litepod-16                # default v5litepod-8 (one host)
#   export RUNTIME_VERSION=v2-alpha-tpuv5-lite          # TPU software version for that type
#   export PROJECT=my-project                           # optional; default gcloud project
#   launch/tpu_vm.sh create                  # create the TPU VM / pod slice
#   launch/tpu_vm.sh install                 # send the checked-out commit to every worker, install
#   launch/tpu_vm.sh prepare configs/ucf101.py --config.data.manual_dir=/data/ucf101 \
#       --config.data.data_dir=gs://BUCKET/tfds          # build the TFDS data set once (worker 0)
#   launch/tpu_vm.sh train configs/ucf101.py gs://BUCKET/runs/ucf101 \
#       --config.data.data_dir=gs://BUCKET/tfds          # same command on every worker
#   launch/tpu_vm.sh eval  configs/ucf101.py gs://BUCKET/runs/ucf101 --config.data.data_dir=...
#   launch/tpu_vm.sh delete
#   launch/tpu_vm.sh pack DIR                # only write DIR/fva_jax.tar.gz (no TPU settings needed)
#
# `install` sends `git archive` of the checked-out commit (HEAD): tracked files only, no
# virtual environments, workdirs or uncommitted changes. It refuses a tree whose tracked files
# have uncommitted changes; ALLOW_DIRTY=1 sends HEAD anyway (without those changes). Every
# worker installs requirements.txt without tensorflow-cpu (training reads no TensorFlow);
# worker 0, which builds the data set (`prepare`), installs it as well.
#
# The official downloads must be unpacked on the disk of the worker that runs `prepare`
# (manual_dir is read with local file APIs); the built TFDS data set then lives on gs://.
# Set DETACH=1 to start training in the background on every worker (log in ~/fva_train.log),
# so that the ssh session may end; restarting the same command resumes from the checkpoints.
set -euo pipefail

usage() { sed -n '2,32p' "$0"; exit 1; }

# pack DIR: DIR/fva_jax.tar.gz = `git archive` of HEAD of the repository here (tracked files
# only); refuses uncommitted changes to tracked files unless ALLOW_DIRTY=1.
pack() {
  local dir="$1" root changes
  root="$(git rev-parse --show-toplevel)"
  changes="$(git -C "$root" status --porcelain --untracked-files=no)"
  if [[ -n "$changes" && "${ALLOW_DIRTY:-0}" != 1 ]]; then
    echo "launch/tpu_vm.sh: uncommitted changes to tracked files in $root (the workers get" \
      "the commit, HEAD, without them): commit them, or set ALLOW_DIRTY=1 to send HEAD" \
      "anyway:" >&2
    echo "$changes" >&2
    exit 1
  fi
  mkdir -p "$dir"
  git -C "$root" archive --format=tar.gz -o "$dir/fva_jax.tar.gz" HEAD
  echo "packed $(git -C "$root" rev-parse --short HEAD) into $dir/fva_jax.tar.gz"
}

cmd="${1:-}"; shift || true
if [[ "$cmd" == pack ]]; then
  [[ $# -eq 1 ]] || usage
  pack "$1"
  exit 0
fi

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE, e.g. us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
REMOTE_DIR="fva_jax"   # relative to the remote home directory
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then COMMON+=(--project="$PROJECT"); fi

# Quotes every argument for the remote shell.
quote_args() { local out=""; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

num_workers() {
  # One network endpoint per host of the slice.
  "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" \
    --format="value(networkEndpoints[].ipAddress)" | tr ';' '\n' | grep -c .
}

run_all() {  # run_all COMMAND: the same command on every worker at once
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$1"
}

main_cmd() {  # main_cmd MODE CONFIG WORKDIR DISTRIBUTED OVERRIDES...
  local mode="$1" config="$2" workdir="$3" dist="$4"; shift 4
  echo "cd ~/$REMOTE_DIR && ~/venv/bin/python -m fva_jax.main --mode=$mode" \
       "--config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")" \
       "--config.distributed.initialize=$dist$(quote_args "$@")"
}

case "$cmd" in
  create)
    "${GCLOUD[@]}" create "$TPU_NAME" "${COMMON[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      --scopes=https://www.googleapis.com/auth/cloud-platform
    ;;
  install)
    packed="$(mktemp -d)"
    pack "$packed"
    "${GCLOUD[@]}" scp "$packed/fva_jax.tar.gz" "$TPU_NAME":fva_jax.tar.gz "${COMMON[@]}" --worker=all
    # Python 3.11 via uv (the TPU images ship an older system Python); JAX with libtpu; the
    # training requirements: requirements.txt less tensorflow-cpu.
    run_all "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && \
      tar -xzf ~/fva_jax.tar.gz -C ~/$REMOTE_DIR && \
      python3 -m pip install --user --quiet uv && \
      ~/.local/bin/uv venv --python 3.11 --allow-existing ~/venv && \
      cd ~/$REMOTE_DIR && \
      grep -v '^tensorflow-cpu' requirements.txt > ~/fva_requirements_train.txt && \
      ~/.local/bin/uv pip install --python ~/venv/bin/python -r ~/fva_requirements_train.txt 'jax[tpu]==$JAX_VERSION' && \
      ~/.local/bin/uv pip install --python ~/venv/bin/python --no-deps -e . && \
      ~/venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    # Worker 0 builds the data set (`prepare`): TFDS's writer needs TensorFlow.
    "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=0 --command="set -e; \
      cd ~/$REMOTE_DIR && \
      ~/.local/bin/uv pip install --python ~/venv/bin/python -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
    ;;
  prepare)
    [[ $# -ge 1 ]] || usage
    config="$1"; shift
    "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=0 \
      --command="$(main_cmd prepare "$config" /tmp/fva_prepare never "$@")"
    ;;
  train|eval)
    [[ $# -ge 2 ]] || usage
    config="$1" workdir="$2"; shift 2
    # Pod slices: one process per host, joined by jax.distributed.initialize().
    dist="auto"
    if [[ "$(num_workers)" -gt 1 ]]; then dist="always"; fi
    remote="$(main_cmd "$cmd" "$config" "$workdir" "$dist" "$@")"
    if [[ "$cmd" == train && "${DETACH:-0}" == 1 ]]; then
      run_all "nohup bash -c $(printf '%q' "$remote") > ~/fva_train.log 2>&1 < /dev/null &"
    else
      run_all "$remote"
    fi
    ;;
  delete)
    "${GCLOUD[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet
    ;;
  *) usage ;;
esac
