#!/usr/bin/env bash
# GPU readiness check: one script a lent GPU machine runs in under 8 minutes.
#
#   bash scripts/benchmarks/device_check.sh                      # on the GPU machine, from anywhere
#   DEVICE_CHECK_DRY=1 bash scripts/benchmarks/device_check.sh   # every step at tiny sizes on CPU (syntax, flags)
#   DEVICE_CHECK_STEPS="e2e scale" bash scripts/benchmarks/device_check.sh   # some steps only
#
# Steps, each under a time limit carved from one overall budget (DEVICE_CHECK_BUDGET_S, default
# 450 s; 900 s in a dry run), each logged, and a failed step does not stop the next:
#   1. parity: the oracle tests of the device numerics (backbone vs torchvision, head, embedding,
#      end-to-end pipeline vs the PyTorch reference, k-means, FINCH) with float32 matmuls at full
#      precision (tests/conftest.py sets jax_default_matmul_precision="highest").
#   2. e2e: scoring path vs the PyTorch reference on the same GPU, batch 1, 8, 64, float32 and
#      bfloat16 (device_e2e.py).
#   3. export: a model (random-init backbone saved as .npz, 1000 random prototypes) exported on the
#      CPU (JAX_PLATFORMS=cpu python scripts/export.py --platforms=cpu,cuda), loaded with
#      protoad_jax.load_exported and run on the GPU at batch 2, compared with the live make_scorer.
#   4. scale: fit() on all patches of a 391-image generated category (benchmark.py scale; on a GPU
#      the default patch budget keeps all 1.23M patches).
#   5. merge: required-K merging from 20,000 singleton clusters down to 1,000 (cluster_benchmark.py
#      --cases=merge; the candidate pass on the GPU, the merges on the host). Last, so the budget
#      may skip it: DEVICE_CHECK_STEPS="merge" runs it alone.
# Writes under $OUT (default <repo>/device_check_out): device_check.log, device_check.md (this
# run's tables), benchmarks.md (the repository's docs/benchmarks.md with device_check.md appended)
# and one log per step. The repository's docs/benchmarks.md gets the same section appended (not in
# a dry run). Prints "[device_check <s>s] ..." progress lines and each step's last log lines to
# stderr, then this run's tables (device_check.md: a summary line per step, the parity result, the
# e2e, export, scale and merge tables); exits 1 when a step failed, timed out or did not fit the
# budget, 2 when the environment is not ready.
# The CPU dry run takes about 3 minutes on 2 cores.
# Needs: python3 with jax (GPU backend), flax, numpy, scipy, pillow, ml_dtypes, absl-py, torch,
# torchvision, opencv-python-headless, scikit-learn, pytest. Missing ones are pip-installed
# (pip install -e ".[test]", and jax[cuda12] at the installed jax version when JAX sees no GPU)
# where a package index is reachable; protoad_jax itself runs from this checkout (PYTHONPATH).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DRY="${DEVICE_CHECK_DRY:-0}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-$([[ "$DRY" == 1 ]] && echo 900 || echo 450)}"
OUT="${OUT:-$REPO/device_check_out}"
PY="${PYTHON:-python3}"
STEPS=" ${DEVICE_CHECK_STEPS:-parity e2e export scale merge} "
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU in steps 1 and 2
START=$(date +%s)
LOG="$OUT/device_check.log"
MD="$OUT/device_check.md"
: >"$LOG"
: >"$MD"
declare -a SUMMARY=()

say() { echo "[device_check $(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }

# Seconds a step may run: its own cap, or what is left of the budget.
limit() {
  local left=$((BUDGET_S - ($(date +%s) - START)))
  echo $((left < $1 ? left : $1))
}

# run_step NAME CAP_S COMMAND...: runs with a timeout, logs to $OUT/NAME.log, records the outcome.
run_step() {
  local name="$1" cap="$2"
  shift 2
  local t
  if [[ "$STEPS" != *" ${name%_collect} "* ]]; then
    say "$name: not among DEVICE_CHECK_STEPS"
    return 0
  fi
  t=$(limit "$cap")
  if ((t < 20)); then
    say "$name: skipped, ${t}s of the ${BUDGET_S}s budget left"
    SUMMARY+=("$name: skipped (budget)")
    return 1
  fi
  say "$name: start (limit ${t}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 5 "$OUT/$name.log" | sed "s/^/[$name] /" | tee -a "$LOG" >&2
  if ((rc == 0)); then
    SUMMARY+=("$name: ok (${dt}s)")
  elif ((rc == 124 || rc == 137)); then
    SUMMARY+=("$name: TIMED OUT after ${dt}s")
  else
    SUMMARY+=("$name: FAILED (exit $rc, ${dt}s)")
  fi
  say "$name: exit $rc after ${dt}s"
  return $rc
}

# ----------------------------------------------------------------------------- environment
if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  DEVICE="CPU dry run ($(nproc) cores)"
else
  DEVICE="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
  DEVICE="${DEVICE:-unknown device (nvidia-smi gave nothing)}"
fi
say "device: $DEVICE; python: $(command -v "$PY"); dry: $DRY; budget: ${BUDGET_S}s; out: $OUT"

MODULES=(jax flax numpy scipy PIL ml_dtypes absl torch torchvision cv2 sklearn pytest)
if ! "$PY" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" "${MODULES[@]}" 2>>"$LOG"; then
  say "some of [${MODULES[*]}] are missing: pip install -e \".[test]\""
  "$PY" -m pip install -q -e ".[test]" >>"$LOG" 2>&1 || { say "pip install failed (no package index?); see $LOG"; exit 2; }
fi
BACKEND="$("$PY" -c "import jax; print(jax.default_backend())" 2>>"$LOG")"
if [[ "$DRY" != 1 && "$BACKEND" != gpu ]]; then
  JAXV="$("$PY" -c "import jax; print(jax.__version__)")"
  say "JAX backend is '$BACKEND', not gpu: pip install jax[cuda12]==$JAXV"
  "$PY" -m pip install -q "jax[cuda12]==$JAXV" >>"$LOG" 2>&1 || say "jax[cuda12] install failed"
  BACKEND="$("$PY" -c "import jax; print(jax.default_backend())" 2>>"$LOG")"
  [[ "$BACKEND" == gpu ]] || { say "JAX still sees no GPU (backend '$BACKEND'); stopping"; exit 2; }
fi
VERSIONS="$("$PY" -c "
import jax, jaxlib, flax, numpy, torch
print(f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, numpy {numpy.__version__}, '
      f'torch {torch.__version__}, devices {[str(d) for d in jax.devices()]}')" 2>>"$LOG")"
say "$VERSIONS"

# ----------------------------------------------------------------------------- steps
PARITY_FILES=(tests/test_backbone.py tests/test_scoring.py tests/test_pipeline.py tests/test_kmeans.py tests/test_finch.py)
# shellcheck disable=SC2054  # the commas are flag values (--batch_sizes=1,8,64), not separators
if [[ "$DRY" == 1 ]]; then
  # Collect every parity test (the selection and imports are valid), run a fast subset.
  run_step parity_collect 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only "${PARITY_FILES[@]}"
  run_step parity 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_scoring.py -k "upsample or gaussian_blur"
  E2E=(--batch_sizes=1 --dtypes=float32,bfloat16 --k=10 --repeats=1)
  E2E_CAP=300  # torch on a shared 2-core CPU, bfloat16 autocast there is slow
  SCALE=(--scale_images=2)
  MERGE=(--merge_sizes=2000 --k=100)
  PLATFORMS=cpu
else
  run_step parity 200 "$PY" -m pytest -q -p no:cacheprovider -ra "${PARITY_FILES[@]}"
  E2E=(--batch_sizes=1,8,64 --dtypes=float32,bfloat16 --k=1000 --repeats=10 --budget_s=15)
  E2E_CAP=130
  SCALE=(--scale_images=391 --cluster_timeout_s=170)
  MERGE=(--merge_sizes=20000 --k=1000)
  PLATFORMS=cpu,cuda
fi

run_step e2e "$E2E_CAP" "$PY" scripts/benchmarks/device_e2e.py "${E2E[@]}" --output="$WORK/e2e.md"

# shellcheck disable=SC2317  # run through bash -c below
export_check() {
  set -e
  "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from protoad_jax import Config, Model, weights

work = Path(sys.argv[1])
w = weights.save_variables(work / "wrn_random.npz", weights.random_variables("wide_resnet50_2"))
protos = np.random.default_rng(0).standard_normal((1000, 1792)).astype(np.float32)
protos /= np.linalg.norm(protos, axis=1, keepdims=True)
Model(protos, Config(), weights=str(w), threshold=0.5).save(work / "model.npz")
print(f"wrote {work / 'model.npz'} (random-init backbone {w})")
EOF
  # The model records its weights file, so export and load_model find the backbone.
  JAX_PLATFORMS=cpu "$PY" scripts/export.py --model="$WORK/model.npz" --output="$WORK/exported" \
    --platforms="$PLATFORMS"
  "$PY" - "$WORK" <<'EOF'
import sys
import time
from pathlib import Path

import jax
import numpy as np

import protoad_jax

work = Path(sys.argv[1])
t = time.perf_counter()
scorer, manifest = protoad_jax.load_exported(work / "exported")
load_s = time.perf_counter() - t
x = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
t = time.perf_counter()
maps, scores = jax.block_until_ready(scorer(x))
first_s = time.perf_counter() - t
live_maps, live_scores = protoad_jax.make_scorer(protoad_jax.load_model(work / "model.npz"))(x)
dm = float(np.abs(np.asarray(maps) - np.asarray(live_maps)).max())
ds = float(np.abs(np.asarray(scores) - np.asarray(live_scores)).max())
size = sum(f.stat().st_size for f in (work / "exported").iterdir()) / 2**20
print(f"| {jax.devices()[0].device_kind} | {manifest['jax_export']['platforms']} | {size:.0f} | "
      f"{load_s:.2f} | {first_s:.2f} | {dm:.3g} | {ds:.3g} |")
EOF
}

export PY WORK PLATFORMS
export -f export_check
run_step export 90 bash -c export_check

run_step scale 200 "$PY" scripts/benchmarks/benchmark.py scale "${SCALE[@]}"
run_step merge 120 "$PY" scripts/benchmarks/cluster_benchmark.py --cases=merge "${MERGE[@]}" \
  --workdir="$WORK/cluster" --output="$WORK/merge.md"

# ----------------------------------------------------------------------------- tables
{
  echo
  echo "## GPU device check: $DEVICE"
  echo
  echo "Written by \`$([[ "$DRY" == 1 ]] && echo "DEVICE_CHECK_DRY=1 ")bash scripts/benchmarks/device_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'); $VERSIONS."
  echo
  for s in "${SUMMARY[@]}"; do echo "- $s"; done
  echo
  if [[ -f "$OUT/parity.log" ]]; then
    echo "Parity tests (float32 matmuls at \"highest\" precision; \`python -m pytest ${PARITY_FILES[*]}\`): \`$(grep -E '(passed|failed|error)' "$OUT/parity.log" | tail -n 1)\`"
    echo
  fi
  [[ -s "$WORK/e2e.md" ]] && cat "$WORK/e2e.md"
  if [[ -f "$OUT/export.log" ]] && grep -q '^| ' "$OUT/export.log"; then
    echo "### exported on CPU (\`JAX_PLATFORMS=cpu python scripts/export.py --platforms=$PLATFORMS\`), run here"
    echo
    echo "| device | artifact platforms | size MB | load_exported s | first call s (batch 2) | max abs map diff vs live | max abs score diff |"
    echo "|---|---|---|---|---|---|---|"
    grep '^| ' "$OUT/export.log"
    echo
  fi
  if [[ -f "$OUT/scale.log" ]]; then
    sed -n '/^### scale/,$p' "$OUT/scale.log"
    echo
  fi
  if [[ -s "$WORK/merge.md" ]]; then
    echo "### merge (\`python scripts/benchmarks/cluster_benchmark.py --cases=merge ${MERGE[*]}\`)"
    echo
    grep -v '^Machine:' "$WORK/merge.md"
    echo
  fi
} >>"$MD"

cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null || : >"$OUT/benchmarks.md"
cat "$MD" >>"$OUT/benchmarks.md"
if [[ "$DRY" != 1 ]]; then
  cat "$MD" >>docs/benchmarks.md
  say "appended the tables to $REPO/docs/benchmarks.md"
fi
say "done in $(($(date +%s) - START))s: ${SUMMARY[*]}"
cat "$MD"
for s in "${SUMMARY[@]}"; do [[ "$s" == *": ok"* ]] || exit 1; done
exit 0
