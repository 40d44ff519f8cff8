#!/usr/bin/env bash
# The GPU checks of the project in one place, for a session that has a GPU machine for a while.
#
#   benchmarks/gpu_checks.sh ops        # CUDA tests of the GLA operator on fla's kernels (tests/test_gla_ops.py)
#   benchmarks/gpu_checks.sh tests      # CUDA tests: sp_gla and fla's model over gloo on one GPU (staged)
#   benchmarks/gpu_checks.sh overhead   # python -m longseq.benchmarks.gla_local_overhead (ZeCO's local work vs fla)
#   benchmarks/gpu_checks.sh scaling-stdit scaling-gla   # per-rank compute of the simulator's targets
#                                       # (--compute-json; each part under 10 minutes, docs/scaling.md)
#
# Logs and JSON go to $OUT (default ./build/gpu-checks). fla is needed for most of it: install
# flash-linear-attention, or put its wheels in .whl/ (docs/zeco.md says how to carry them to a machine
# with no package index). Triton's and fla's autotuning caches go to build/triton-cache, so a second
# call on the same machine skips the (minutes of) autotuning.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-checks}
mkdir -p "$OUT" build/triton-cache
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache} PYTHONUNBUFFERED=1
# A venv that sees the machine's torch, with longseq installed (editable, no dependencies fetched)
# and the wheels of .whl/ if any.
VENV=${VENV:-build/gpu-venv}
test -x "$VENV/bin/python" || python3 -m venv --system-site-packages "$VENV" || exit 1
PY=$VENV/bin/python
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl || exit 1
fi
"$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
try:
    import fla; print("fla", getattr(fla, "__version__", "?"))
except ImportError as e:
    print("fla missing:", e)
PY
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device is visible: these checks need a GPU"; exit 3; }
rc=0
for part in ${@:-ops tests overhead}; do
  case $part in
    ops)
      "$PY" -m pytest -p no:cacheprovider -rs -q --timeout 900 tests/test_gla_ops.py \
          2>&1 | tee "$OUT/ops.log" || rc=1 ;;
    tests)
      "$PY" -m pytest -p no:cacheprovider -rs -q --timeout 900 -k cuda --durations 0 \
          tests/test_comm_staging.py tests/test_adapters_fla_gla.py 2>&1 | tee "$OUT/tests.log" || rc=1 ;;
    overhead)
      "$PY" -m longseq.benchmarks.gla_local_overhead --json "$OUT/gla_local_overhead.json" \
          2>&1 | tee "$OUT/gla_local_overhead.txt" || rc=1 ;;
    scaling-stdit|scaling-gla)
      "$PY" -m longseq.benchmarks.scaling --device cuda --families "${part#scaling-}" \
          --compute-json "$OUT/compute_cuda.json" 2>&1 | tee -a "$OUT/scaling.log" || rc=1 ;;
    *) echo "unknown part '$part' (ops, tests, overhead, scaling-stdit, scaling-gla)"; exit 2 ;;
  esac
done
exit $rc
