#!/usr/bin/env bash
# Full-video clustering vs frame sampling on sparse_events (configs/demo.py), on CPU.
#
# Four trainings of the same network (ResNet-18 width 8, 32 px, K=8 frames/clusters) with the
# same number of steps (16 epochs of sparse_events/small = 512 steps of batch 8), the same
# optimizer and schedule; only config.model.sampling / cluster_method differ:
#   full_cumulative  full video, cumulative clustering (the paper's method; the first 2 of the
#                    16 epochs use uniform sampling, as in the paper, which also trains the
#                    stem BatchNorm statistics that full-video training keeps frozen)
#   full_slope       the same with slope clustering
#   uniform          TSN uniform sampling of K frames, all 16 epochs
#   dense            K consecutive frames, dense_stride 2 apart, all 16 epochs
# then prints a Markdown table of test top-1 / mean class accuracy from each
# WORKDIR/final_metrics.json.
#
# Usage: benchmarks/demo_comparison.sh [OUT_DIR]   (default /tmp/demo_cmp)
#   env DATA_DIR=...  TFDS data_dir (default OUT_DIR/tfds; sparse_events/small is built there
#                     on first use, ~1 min)
#   env PYTHON=...    interpreter (default python)
#   env RUNS="uniform dense"  a subset of the runs; extra flags: env EXTRA="--config.seed=1"
# A finished run (final_metrics.json present) is not repeated; delete its folder to redo it.
# A run that was interrupted resumes from its last checkpoint.
set -euo pipefail

OUT=${1:-/tmp/demo_cmp}
DATA_DIR=${DATA_DIR:-$OUT/tfds}
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-"full_cumulative full_slope uniform dense"}
EXTRA=${EXTRA:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"

flags_for() {
  case $1 in
    full_cumulative) echo "--config.model.sampling=cluster --config.model.cluster_method=cumulative" ;;
    full_slope) echo "--config.model.sampling=cluster --config.model.cluster_method=slope" ;;
    uniform) echo "--config.model.sampling=uniform --config.train.uniform_warmup_epochs=0" ;;
    dense) echo "--config.model.sampling=dense --config.train.uniform_warmup_epochs=0" ;;
    *) echo "unknown run '$1' (use full_cumulative full_slope uniform dense)" >&2; exit 2 ;;
  esac
}

for run in $RUNS; do
  workdir=$OUT/$run
  if [[ -f $workdir/final_metrics.json ]]; then
    echo "== $run: already finished ($workdir/final_metrics.json)"
    continue
  fi
  # shellcheck disable=SC2046
  cmd=(env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu
       "$PYTHON" -m fva_jax.main --config="$REPO/configs/demo.py" --workdir="$workdir"
       --config.data.data_dir="$DATA_DIR" $(flags_for "$run") $EXTRA)
  echo "== $run: ${cmd[*]}"
  start=$(date +%s)
  "${cmd[@]}" > "$OUT/$run.log" 2>&1 || { echo "$run failed, see $OUT/$run.log"; tail -5 "$OUT/$run.log"; exit 1; }
  echo $(( $(date +%s) - start )) > "$workdir/wall_seconds.txt"
  echo "== $run: done in $(cat "$workdir/wall_seconds.txt") s"
done

"$PYTHON" - "$OUT" $RUNS <<'EOF'
import json, pathlib, sys
out, runs = pathlib.Path(sys.argv[1]), sys.argv[2:]
labels = {"full_cumulative": "full video, cumulative clustering (2 uniform warm-up epochs)",
          "full_slope": "full video, slope clustering (2 uniform warm-up epochs)",
          "uniform": "uniform sampling of K frames (TSN)",
          "dense": "dense sampling: K consecutive frames, stride 2"}
print("| training and test sampling (K=8) | steps | test top-1 | test top-5 | mean class acc. | "
      "same weights, uniform test | wall s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for run in runs:
  f = out / run / "final_metrics.json"
  if not f.exists():
    print(f"| {labels[run]} | not finished | | | | | |")
    continue
  m = json.loads(f.read_text())
  e = m["eval"]
  u = m.get("eval_uniform")
  wall = out / run / "wall_seconds.txt"
  print(f"| {labels[run]} | {m['step']} | {100 * e['top1']:.1f} % | {100 * e['top5']:.1f} % | "
        f"{100 * e['mean_class_accuracy']:.1f} % | "
        f"{'%.1f %%' % (100 * u['top1']) if u and run.startswith('full') else '-'} | "
        f"{wall.read_text().strip() if wall.exists() else '?'} |")
n = next((json.loads((out / r / "final_metrics.json").read_text())["eval"]["num_examples"]
          for r in runs if (out / r / "final_metrics.json").exists()), None)
print(f"\n{n} test videos, 6 classes (chance 16.7 %).")
EOF
