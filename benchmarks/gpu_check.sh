#!/usr/bin/env bash
# The GPU check of issue 11 in one script: the trainer on the GPU (the demo config; ResNet-50
# at 224 px on the long synthetic set), then the speed benchmarks, with a time budget.
#
#   benchmarks/gpu_check.sh prepare   # HERE (network, TensorFlow): wheels -> .whl/, data -> .gpu_data/
#   benchmarks/gpu_check.sh run       # THERE: JAX+CUDA, Flax, Optax, Orbax, NumPy; no TFDS,
#                                     # Grain, ml_collections, clu, simplejpeg, array_record
#   GPU_CHECK_SMOKE=1 benchmarks/gpu_check.sh prepare && GPU_CHECK_SMOKE=1 benchmarks/gpu_check.sh run
#                                     # rehearsal on a CPU: everything shrunk, and the packages
#                                     # the GPU image lacks hidden (benchmarks/gpu_image_sim.py)
#
# The device tool's call (from the repository root; .whl and .gpu_data are git-ignored
# through .git/info/exclude by `prepare`, so they must be carried):
#   run(command="bash benchmarks/gpu_check.sh run", carry=[".whl", ".gpu_data"], timeout_s=600)
# Together: the repository (~1 MB), the wheels (~12 MB) and sparse_events/long_slice (24 MB,
# stored at 32 px) stay under the tool's 64 MiB. The demo's set (sparse_events/small, 32 MB)
# does not fit beside them: the trainer builds it there (no TensorFlow needed, a few seconds).
#
# Phases, in this order (GPU_CHECK_PHASES picks a subset, e.g. "step256 step4096 memory" for a
# second call), each under `timeout`, all within GPU_CHECK_BUDGET_S (default 570 s) from the
# start; a phase that would start with less than a minute left is skipped:
#   install     pip install the carried wheels into /tmp/site (once per machine)
#   demo        python -m fva_jax.main --config=configs/demo.py
#   r50         python -m fva_jax.main --config=configs/long_synthetic.py (200 steps), peak memory
#   throughput  benchmarks/train_throughput.py on the same config (trainer vs step alone)
#   step256     benchmarks/step_time.py R-50 224 px, T=256, B=4, bf16, default budget
#   step4096    the same at T=4096, B=1, --activation-budget-mb 16000 (no unchunked plan)
#   memory      benchmarks/memory.py R-50 224 px bf16, T=256 and 16,384
# Logs: $OUT/<phase>.log and $OUT/summary.txt (at most 8 files, as the tool returns); the
# summary's key lines are printed last.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${1:-run}
SMOKE=${GPU_CHECK_SMOKE:-0}
PYTHON=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then
  WHEELS=${WHEELS:-.whl-smoke}
  DATA_DIR=${DATA_DIR:-$REPO/.gpu_data-smoke}
  SITE=${SITE:-/tmp/site-smoke}
  WHEEL_PYTHON=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
else
  WHEELS=${WHEELS:-.whl}
  DATA_DIR=${DATA_DIR:-$REPO/.gpu_data}
  SITE=${SITE:-/tmp/site}
  WHEEL_PYTHON=3.12 # the GPU image's Python
fi
# The carried distributions: what the trainer and the data path import that the image lacks,
# and their own requirements that it lacks (pinned to the versions installed here).
WHEEL_PACKAGES="tensorflow-datasets array-record grain clu ml-collections simplejpeg dm-tree \
immutabledict promise simple-parsing docstring-parser tensorflow-metadata \
googleapis-common-protos termcolor toml portpicker"

prepare() {
  local exclude data_name
  exclude=$(git rev-parse --git-path info/exclude)
  data_name=$(basename "$DATA_DIR")
  for ignored in "/$WHEELS/" "/$data_name/"; do
    grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
  done
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  for package in $WHEEL_PACKAGES; do
    version=$($PYTHON -c "import importlib.metadata as m; print(m.version('$package'))") || exit 1
    # shellcheck disable=SC2086
    if ! $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" \
      --implementation cp $platforms -d "$WHEELS" "$package==$version"; then
      # Pure-Python packages published only as source (promise): build their wheel here.
      $PYTHON -m pip wheel -q --no-deps --no-binary=:all: -w "$WHEELS" "$package==$version" || exit 1
    fi
  done
  if [ "$SMOKE" = 1 ]; then
    configs="long_tiny"
  else
    configs="long_slice"
  fi
  for config in $configs; do
    $PYTHON -m fva_jax.data.build --name=sparse_events --config="$config" --data_dir="$DATA_DIR" || exit 1
  done
  rm -rf "$DATA_DIR/downloads"
  du -sh "$WHEELS" "$DATA_DIR"
  git ls-files -z | du -cb --files0-from=- | tail -1 | awk '{printf "tracked files: %.1f MB\n", $1 / 1e6}'
}

if [ "$MODE" = prepare ]; then
  prepare
  exit
fi
[ "$MODE" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
rm -rf "$WORK" && mkdir -p "$WORK"
BUDGET=${GPU_CHECK_BUDGET_S:-570}
PHASES=${GPU_CHECK_PHASES:-install demo r50 throughput step256 step4096 memory}
START=$(date +%s)
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache # shared: throughput reuses r50's steps
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ "$SMOKE" = 1 ]; then
  mkdir -p "$WORK/sim"
  printf 'import sys\nsys.path.insert(0, %s)\nimport gpu_image_sim\ngpu_image_sim.install(%s)\n' \
    "'$REPO/benchmarks'" "'$SITE'" >"$WORK/sim/sitecustomize.py"
  export PYTHONPATH=$WORK/sim:$PYTHONPATH
  export JAX_PLATFORMS=cpu
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# phase NAME CAP_S COMMAND...: runs COMMAND under timeout min(CAP_S, what the budget leaves),
# logging to $OUT/NAME.log; skipped if not in $PHASES or under 60 s would be left.
phase() {
  local name=$1 cap=$2
  shift 2
  case " $PHASES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 60 ]; then
    note "$name: SKIPPED (${left}s of the budget left)"
    return 0
  fi
  local limit=$((cap < left ? cap : left))
  local t0
  t0=$(date +%s)
  # bash -c: the command may be one of the functions below (exported).
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    note "$name: TIMED OUT after ${took}s (limit ${limit}s)"
  else
    note "$name: rc=$rc in ${took}s"
  fi
  return 0
}

install_wheels() {
  if [ ! -f "$SITE/.installed" ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || return 1
    touch "$SITE/.installed"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi
  # Grain's worker processes hand their steps (up to 616 MB each at 224 px) over in /dev/shm.
  df -h /dev/shm /tmp
  nproc
  $PYTHON - <<'EOF'
import importlib.metadata as m
import jax
import clu.metrics, grain, ml_collections, simplejpeg, array_record, tensorflow_datasets  # noqa
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets", "grain"):
    print(name, m.version(name))
print("devices:", jax.devices(), jax.devices()[0].memory_stats())
import fva_jax.training.train  # noqa: the trainer imports
EOF
}

# python -m MODULE ARGS..., then the device's peak memory (what JAX reports) at exit.
cat >"$WORK/with_peak.py" <<'EOF'
import atexit, runpy, sys
import jax


def report():
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"PEAK_DEVICE_MEMORY_GIB {stats['peak_bytes_in_use'] / 2**30:.2f}", flush=True)


atexit.register(report)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
EOF
with_peak() { $PYTHON "$WORK/with_peak.py" "$@"; }
export -f install_wheels with_peak
export PYTHON SITE WHEELS WORK

if [ "$SMOKE" = 1 ]; then
  DEMO_ARGS=(--config.data.builder_config=tiny --config.train.num_train_steps=6
    --config.train.uniform_warmup_epochs=1 --config.data.frames_per_device=64
    --config.train.batch_size=4 --config.eval.batch_size=4 --config.data.num_workers=1
    --config.fast_compile=True)
  LONG=(data.builder_config=long_tiny model.backbone=resnet18 model.width=8 data.crop_size=32
    data.resize_short=32 data.frames_per_device=512 model.dtype=float32 model.num_clusters=8
    data.num_workers=1 train.num_train_steps=24 train.log_every_steps=8 fast_compile=True)
  STEP_COMMON=(--model resnet18 --width 4 --resolution 32 --num-clusters 2 --chunk-size 8
    --steps 1 --fast-compile --plans recompute)
  STEP256=(--frames 16 --batch-size 2)
  STEP4096=(--frames 64 --batch-size 1 --activation-budget-mb 0.5)
  MEMORY=(--model resnet18 --width 4 --resolution 32 --num-clusters 2 --frames 16,32
    --skip-unchunked-above 16 --keep-stem --fast-compile)
  THROUGHPUT=(--steps 8 --warmup-steps 4)
else
  DEMO_ARGS=()
  LONG=()
  STEP_COMMON=(--model resnet50 --width 64 --resolution 224 --num-clusters 16 --dtype bfloat16
    --plans recompute)
  STEP256=(--frames 256 --batch-size 4)
  STEP4096=(--frames 4096 --batch-size 1 --activation-budget-mb 16000)
  MEMORY=(--model resnet50 --resolution 224 --num-clusters 16 --dtype bfloat16
    --frames 256,16384 --skip-unchunked-above 256)
  THROUGHPUT=(--steps 40 --warmup-steps 8)
fi
LONG_FLAGS=(--config.data.data_dir="$DATA_DIR")
LONG_SETS=(--set data.data_dir="$DATA_DIR")
for item in "${LONG[@]}"; do
  LONG_FLAGS+=("--config.$item")
  LONG_SETS+=(--set "$item")
done

note "gpu_check: smoke=$SMOKE budget=${BUDGET}s phases: $PHASES ($(date -u +%FT%TZ))"
phase install 60 install_wheels
phase demo 130 with_peak fva_jax.main --config=configs/demo.py --workdir="$WORK/demo" \
  --config.data.data_dir="$WORK/demo_data" "${DEMO_ARGS[@]}"
phase r50 200 with_peak fva_jax.main --config=configs/long_synthetic.py --workdir="$WORK/r50" \
  "${LONG_FLAGS[@]}"
phase throughput 130 $PYTHON benchmarks/train_throughput.py --config=configs/long_synthetic.py \
  --workdir="$WORK/throughput" "${THROUGHPUT[@]}" "${LONG_SETS[@]}"
phase step256 110 $PYTHON benchmarks/step_time.py "${STEP_COMMON[@]}" "${STEP256[@]}"
phase step4096 110 $PYTHON benchmarks/step_time.py "${STEP_COMMON[@]}" "${STEP4096[@]}"
phase memory 90 $PYTHON benchmarks/memory.py "${MEMORY[@]}"

note "--- key lines ($(($(date +%s) - START))s in all)"
for name in $PHASES; do
  log=$OUT/$name.log
  [ -f "$log" ] || continue
  {
    echo "[$name]"
    grep -E "FINAL_METRICS|PEAK_DEVICE_MEMORY|: plan (unchunked|keep_stem|recompute) \(|steps/s|^chosen:|what its FLOPs|^ *(cluster|uniform|unchunked|keep_stem|recompute|trainer|step only) |trainer / step|^ *[0-9]+ +(unchunked|keep_stem|recompute) |Error|error:" "$log" |
      sed -E 's/^[IWE][0-9]{4} [0-9:.]+ +[0-9]+ [a-z_]+\.py:[0-9]+\] //' | awk '!seen[$0]++' | tail -n 14
    tail -n 1 "$log" | grep '^{' || true
  } >>"$SUMMARY"
done
cat "$SUMMARY"
