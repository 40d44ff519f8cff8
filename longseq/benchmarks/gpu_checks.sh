#!/usr/bin/env bash
# The project's GPU checks, sized for one lease: one GPU, 15 minutes in all, each call under 10.
#
#   OUT=/some/dir benchmarks/gpu_checks.sh           # the default parts, about 6-8 minutes on an H100/H200
#   benchmarks/gpu_checks.sh switch scan            # any subset, in this order:
#
#   build     JIT-compile the CUDA extension of csrc/ (in the background, while overhead runs)
#   overhead  (c) ZeCO's local work vs fla's chunk_gla, 1b layer, T = 8192 and 32768, bf16
#             (python -m longseq.benchmarks.gla_local_overhead, fla's autotuning pinned to its first config)
#   switch    (a)+(d) pack/unpack GB/s of each backend vs device copy at ST-DiT 720M shapes (B=1,
#             T=16/32/64, S=4096, C=1152, bf16, P=8), each backend checked bit for bit against PyTorch,
#             and the fused All-Scan update vs the old one (python -m longseq.benchmarks.switch_kernels)
#   compute   (b) per-rank compute of the simulator's targets (benchmarks.scaling --compute-json), DSP
#             and ZeCO, two repeats (the simulator reads it: compute_json=$OUT/compute_cuda.json)
#   ops, tests  (not default; long) CUDA tests of the GLA operator / of sp_gla over gloo on one GPU
#
# Every step has its own timeout (seconds in STEP_TIMEOUT below) so the whole call stays under
# 10 minutes; a step that times out is reported and the others still run. Tables and logs go to
# $OUT (default build/gpu-checks): env.txt, *.md, *.json, *.log. Triton's tiles in longseq.kernels are
# pinned (no autotuning); fla's autotuners keep their first config (longseq.benchmarks.pinned), so
# no step spends minutes tuning. fla comes from pip, or from wheels in .whl/ (docs/zeco.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-checks}
mkdir -p "$OUT" build/triton-cache build/torch-extensions
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch-extensions} MAX_JOBS=${MAX_JOBS:-8}
# A venv that sees the machine's torch, with longseq installed (editable, no dependencies fetched)
# and the wheels of .whl/ if any.
VENV=${VENV:-build/gpu-venv}
test -x "$VENV/bin/python" || python3 -m venv --system-site-packages "$VENV" || exit 1
PY=$VENV/bin/python
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl || exit 1
fi
# LONGSEQ_BUILD_CUDA=0: the install does not compile csrc/ (outside any timeout); the build step
# JIT-compiles it in the background under its own timeout while the overhead step runs.
LONGSEQ_BUILD_CUDA=0 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
declare -A STEP_TIMEOUT=([build]=300 [overhead]=200 [switch]=150 [compute-stdit]=110 [compute-gla]=110
                         [ops]=540 [tests]=540)
"$PY" - <<'PY' | tee "$OUT/env.txt"
import datetime, subprocess, torch
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "?")
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
for mod in ("triton", "fla"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(mod, "missing:", e)
PY
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device is visible: these checks need a GPU"; exit 3; }
rc=0
step() {  # step NAME CMD...: run under its timeout, log to $OUT/NAME.log, remember a failure
  local name=$1; shift
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT[$name]}" "$@" > >(tee "$OUT/$name.log") 2>&1
  local s=$?
  echo "[$name] exit $s after $((SECONDS - t0)) s (timeout ${STEP_TIMEOUT[$name]} s)" | tee -a "$OUT/steps.txt"
  [ $s -eq 0 ] || rc=1
}
parts=${@:-build overhead switch compute}
build_pid=
for part in $parts; do
  case $part in
    build)
      ( step build "$PY" -c "import torch; from longseq.kernels import cuda_ext; \
why = cuda_ext.unavailable_reason(torch.device('cuda')); print(why or 'CUDA extension loaded'); raise SystemExit(1 if why else 0)" ) &
      build_pid=$! ;;
    overhead)
      step overhead "$PY" -m longseq.benchmarks.pinned longseq.benchmarks.gla_local_overhead \
          --tokens 8192 32768 --dtypes bf16 --repeats 10 --warmup 2 --json "$OUT/gla_local_overhead.json" ;;
    switch)
      [ -n "$build_pid" ] && { wait "$build_pid"; build_pid=; }
      step switch "$PY" -m longseq.benchmarks.switch_kernels --device cuda --frames 16 32 64 --procs 8 \
          --repeats 20 --warmup 3 --out-dir "$OUT" ;;
    compute)
      for fam in stdit gla; do
        step compute-$fam "$PY" -m longseq.benchmarks.pinned longseq.benchmarks.scaling --device cuda \
            --families $fam --repeats 2 --warmup 1 --compute-json "$OUT/compute_cuda.json"
      done ;;
    ops)
      step ops "$PY" -m pytest -p no:cacheprovider -rs -q --timeout 900 tests/test_gla_ops.py ;;
    tests)
      step tests "$PY" -m pytest -p no:cacheprovider -rs -q --timeout 900 -k cuda --durations 0 \
          tests/test_comm_staging.py tests/test_adapters_fla_gla.py ;;
    *) echo "unknown part '$part' (build, overhead, switch, compute, ops, tests)"; exit 2 ;;
  esac
done
[ -n "$build_pid" ] && wait "$build_pid"
grep -q "exit [^0]" "$OUT/steps.txt" 2>/dev/null && rc=1
exit $rc
