#!/usr/bin/env bash
# Full-video clustering vs frame sampling on sparse_events (configs/demo.py), on CPU, 3 seeds.
#
# Rows, each trained with every seed in SEEDS (config.seed; the data set's generator seed is
# fixed, so every run sees the same videos), same network (configs/demo.py's ResNet-18, width,
# crop), same K, optimizer and schedule, and the same number of steps:
#   full      configs/demo.py as it is: full video with its clustering method, its uniform
#             warm-up epochs first (as in the paper)
#   uniform   TSN uniform sampling of K frames in every epoch (centre of each segment at test)
#   dense     K consecutive frames, model.dense_stride apart, in every epoch (centred at test)
#   full_cumulative  (not run by default) the full row with cumulative clustering
# The baselines of a seed run after its full row and get --config.train.num_train_steps = the
# full row's final step, so their learning-rate schedule spans the same steps even where
# sampled and full-video epochs have different step counts.
#
# Prints a Markdown table: per row, test top-1 as mean ± sample standard deviation over the
# seeds (and the single values), mean class accuracy, for full-video rows the same weights
# evaluated with uniform sampling, steps and mean wall time; then how many test videos'
# test-time sampled K frames include an event frame (uniform: TSN centres; dense: the centred
# clip), computed with the model's own index rules from each test video's stored event_start
# and length (sparse_events regenerates them from the builder config's spec, deterministically).
#
# Usage: benchmarks/demo_comparison.sh [OUT_DIR]   (default /tmp/demo_cmp)
#   env DATA_DIR=...   TFDS data_dir (default OUT_DIR/tfds; built on first use, ~10 s)
#   env PYTHON=...     interpreter (default python)
#   env RUNS="full uniform dense"  rows (full_cumulative is also known)
#   env SEEDS="0 1 2"  config.seed values
#   env EXTRA="..."    extra flags for every run (e.g. --config.train.num_epochs=2 for a smoke test)
#   env TABLE_ONLY=1   only print the table of what is already in OUT_DIR
# A finished run (final_metrics.json present) is not repeated; delete its folder to redo it.
# A run that was interrupted resumes from its last checkpoint. Each training takes minutes on
# 2 CPU cores (see configs/demo.py): 3 rows x 3 seeds took 18 minutes there (commit d1b2951).
set -euo pipefail

OUT=${1:-/tmp/demo_cmp}
DATA_DIR=${DATA_DIR:-$OUT/tfds}
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-"full uniform dense"}
SEEDS=${SEEDS:-"0 1 2"}
EXTRA=${EXTRA:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu
mkdir -p "$OUT"

flags_for() {
  case $1 in
    full) echo "" ;;
    full_cumulative) echo "--config.model.sampling=cluster --config.model.cluster_method=cumulative" ;;
    uniform) echo "--config.model.sampling=uniform --config.train.uniform_warmup_epochs=0" ;;
    dense) echo "--config.model.sampling=dense --config.train.uniform_warmup_epochs=0" ;;
    *) echo "unknown run '$1' (use full full_cumulative uniform dense)" >&2; exit 2 ;;
  esac
}

final_step() {  # the step in WORKDIR/final_metrics.json
  "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$1/final_metrics.json"
}

train() {  # train RUN SEED [flags...]
  local run=$1 seed=$2
  shift 2
  local workdir=$OUT/$run/seed$seed
  if [[ -f $workdir/final_metrics.json ]]; then
    echo "== $run seed $seed: already finished ($workdir/final_metrics.json)"
    return
  fi
  mkdir -p "$OUT/$run"
  # shellcheck disable=SC2046,SC2086
  local cmd=("$PYTHON" -m fva_jax.main --config="$REPO/configs/demo.py" --workdir="$workdir"
    --config.data.data_dir="$DATA_DIR" --config.seed="$seed" $(flags_for "$run") "$@" $EXTRA)
  echo "== $run seed $seed: ${cmd[*]}   (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  local start
  start=$(date +%s)
  "${cmd[@]}" > "$OUT/$run/seed$seed.log" 2>&1 || {
    echo "$run seed $seed failed, see $OUT/$run/seed$seed.log"
    tail -5 "$OUT/$run/seed$seed.log"
    exit 1
  }
  echo $(($(date +%s) - start)) > "$workdir/wall_seconds.txt"
  echo "== $run seed $seed: done in $(cat "$workdir/wall_seconds.txt") s" \
    "(load average $(cut -d' ' -f1-3 /proc/loadavg))"
}

if [[ -z ${TABLE_ONLY:-} ]]; then
  for seed in $SEEDS; do
    steps_flag=()
    for run in $RUNS; do
      case $run in
        full*) train "$run" "$seed" ;;
        *)
          # Same number of steps as the full-video run of this seed, when there is one.
          if [[ ${#steps_flag[@]} -eq 0 && -f $OUT/full/seed$seed/final_metrics.json ]]; then
            steps_flag=(--config.train.num_train_steps="$(final_step "$OUT/full/seed$seed")")
          fi
          train "$run" "$seed" "${steps_flag[@]}"
          ;;
      esac
    done
  done
fi

"$PYTHON" - "$OUT" "$REPO" "$SEEDS" $RUNS <<'EOF'
import importlib.util, json, pathlib, statistics, sys

out, repo, seeds, runs = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4:]
spec = importlib.util.spec_from_file_location("demo_config", f"{repo}/configs/demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
config = demo.get_config()
k = config.model.num_clusters
labels = {
    "full": f"full video, {config.model.cluster_method} clustering (window "
    f"{config.model.window}; {config.train.uniform_warmup_epochs:g} uniform warm-up epochs)",
    "full_cumulative": "full video, cumulative clustering "
    f"({config.train.uniform_warmup_epochs:g} uniform warm-up epochs)",
    "uniform": f"uniform sampling of {k} frames (TSN)",
    "dense": f"dense sampling: {k} consecutive frames, stride {config.model.dense_stride}",
}


def pm(values):
    """'mean ± sd %' over the seeds (sample standard deviation), plus the single values."""
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    sd = f"{100 * statistics.stdev(values):.1f}" if len(values) > 1 else "? (1 seed)"
    each = ", ".join(f"{100 * v:.1f}" for v in values)
    return f"{mean:.1f} ± {sd} % ({each})"


print(f"| training and test sampling (K={k}) | seeds | steps | test top-1, mean ± sd (each seed) | "
      "mean class acc. | same weights, uniform test | wall s (mean) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
num_examples = None
for run in runs:
    metrics, walls = [], []
    for seed in seeds:
        f = out / run / f"seed{seed}" / "final_metrics.json"
        if f.exists():
            metrics.append(json.loads(f.read_text()))
            wall = f.parent / "wall_seconds.txt"
            if wall.exists():
                walls.append(int(wall.read_text()))
    if not metrics:
        print(f"| {labels[run]} | 0 of {len(seeds)} finished | | | | | |")
        continue
    num_examples = metrics[0]["eval"]["num_examples"]
    uniform_test = [m["eval_uniform"]["top1"] for m in metrics if m.get("eval_uniform")]
    print(
        f"| {labels[run]} | {len(metrics)} of {len(seeds)} | "
        f"{'/'.join(sorted({str(m['step']) for m in metrics}))} | "
        f"{pm([m['eval']['top1'] for m in metrics])} | "
        f"{pm([m['eval']['mean_class_accuracy'] for m in metrics])} | "
        f"{pm(uniform_test) if run.startswith('full') else '-'} | "
        f"{statistics.mean(walls) if walls else float('nan'):.0f} |"
    )

# Event-hit rates of the test split, with the model's own test-time index rules.
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fva_jax.data import builders, sparse_events  # noqa: E402
from fva_jax.models import full_video  # noqa: E402

builder_config = next(
    c for c in builders.SparseEvents.BUILDER_CONFIGS if c.name == config.data.builder_config
)
se_spec = builder_config.spec
videos = [sparse_events.make_video(se_spec, config.data.eval_split, i) for i in range(se_spec.num_test)]
length = jnp.asarray([v["num_frames"] for v in videos])
start = np.asarray([v["event_start"] for v in videos])[:, None]
hits = {}
for name, idx in (
    ("uniform", full_video.uniform_indices(length, k)),
    ("dense", full_video.dense_indices(length, k, config.model.dense_stride)),
):
    idx = np.asarray(idx)
    hit = ((idx >= start) & (idx < start + se_spec.event_frames)).any(axis=1)
    hits[name] = int(hit.sum())
print(
    f"\n{num_examples} test videos, {se_spec.num_classes} classes (chance "
    f"{100 / se_spec.num_classes:.1f} %). Event hit rate on the test split (the test-time K frames "
    f"include one of the {se_spec.event_frames} event frames): uniform {hits['uniform']} of "
    f"{len(videos)} videos, dense {hits['dense']} of {len(videos)}."
)
EOF
