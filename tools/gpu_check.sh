#!/usr/bin/env bash
# jaxreward on one NVIDIA GPU (H100/H200), from a bare offline machine, in one command of <= 8 minutes:
#
#   bash tools/gpu_check.sh          # from the project root; results under $OUT (else ./gpu-check-out)
#
# Needs the wheels the GPU image lacks in .whl/ (run ../shared/device/prepare-wheels.sh on a machine with a
# registry first); the image's own jax (CUDA), flax, optax, orbax, torch and transformers are used as they are.
# Stages, each capped so that the later ones still run (DEADLINE seconds in all):
#   0  env.txt         GPU, driver, versions, cuDNN
#   1  attention.log   tests/test_attention.py: cuDNN (dense-mask packed and unpacked) and 'auto' vs the fp32
#                      reference, blockwise vs the reference, under JAX_DEFAULT_MATMUL_PRECISION=highest
#   2  bench.log/json  tools/train_bench.py: d 2048, 4 layers, bf16, rows of 2,048 tokens, unpacked vs packed x
#                      xla / cudnn / blockwise: step time, real tokens/s, MFU over 989 TFLOP/s, peak memory
#   3  tests.log       the GPU-relevant tests (model, packing, loss, HF parity, a short training run) at fp32
#                      matmul precision 'highest' -- the precision the README's 1e-4 parity claims hold under
#   4  tests_tf32.log  model + packing + HF export parity at JAX's GPU default (TF32 for fp32 dots): shows which
#                      fp32 tolerances assume full-precision matmuls
# The 8-fake-CPU-device sharding tests and tests/test_multiprocess.py stay on CPU (the default backend here is
# the GPU), and so do splash's interpret-mode tests; the splash kernel's real run needs a TPU.
set -uo pipefail
export OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
DEADLINE=${DEADLINE:-470}
T0=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "[$((SECONDS - T0))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
cap() { local c=$(( $(left) - $2 )); [[ $c -gt $1 ]] && c=$1; echo $c; }  # min(stage cap, time left - reserve)

# --- 0. environment ---------------------------------------------------------------------------------------
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxreward-site .whl/*.whl > "$OUT/install.log" 2>&1 \
    || say "WARNING: installing .whl/ failed (see install.log)"
  export PYTHONPATH=/tmp/jaxreward-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  say "WARNING: no .whl/ (ml-collections, grain, array-record, portpicker): run prepare-wheels.sh first"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY --version
  $PY - <<'EOF'
import importlib
import jax
print("devices", jax.devices(), "backend", jax.default_backend())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "transformers", "torch"):
  try:
    print(name, getattr(importlib.import_module(name), "__version__", "?"))
  except Exception as e:  # noqa: BLE001
    print(name, "MISSING", type(e).__name__, e)
try:
  from jax._src.lib import cuda_versions
  print("cudnn", cuda_versions.cudnn_get_version() if cuda_versions else None)
except Exception as e:  # noqa: BLE001
  print("cudnn ?", e)
EOF
} > "$OUT/env.txt" 2>&1
say "env: $(grep -E '^(devices|jax |cudnn)' "$OUT/env.txt" | tr '\n' ' ')"
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  say "no GPU backend in jax: stopping"; exit 1
fi
PYTEST=($PY -m pytest -v --tb=short -p no:cacheprovider)
count() { echo "$(grep -c ' PASSED' "$1") passed, $(grep -c ' FAILED' "$1") failed, $(grep -c ' SKIPPED' "$1") skipped"; }

# --- 1. attention kernels vs the reference ----------------------------------------------------------------
C=$(cap 100 330)
JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s KILL "$C" "${PYTEST[@]}" tests/test_attention.py > "$OUT/attention.log" 2>&1
say "1 attention (precision highest, cap ${C}s): rc=$? $(count "$OUT/attention.log")"
grep -E " FAILED" "$OUT/attention.log" | head -n 8 | tee -a "$SUMMARY"

# --- 2. train-step benchmark ------------------------------------------------------------------------------
C=$(cap 200 130)
timeout -s KILL "$C" $PY tools/train_bench.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
say "2 bench (cap ${C}s): rc=$?"
grep -E "^(model|[UP]-|[0-9]+ x)" "$OUT/bench.log" | tee -a "$SUMMARY"

# --- 3. GPU-relevant tests at full fp32 precision ---------------------------------------------------------
TESTS=(tests/test_loss.py tests/test_model.py tests/test_packing.py
       "tests/test_hf.py::test_import_matches_transformers_hidden_states"
       "tests/test_hf.py::test_export_scores_match_transformers_and_round_trip"
       "tests/test_train.py::test_gradient_accumulation_equals_the_big_batch"
       "tests/test_train.py::test_non_finite_step_leaves_the_state_untouched")
C=$(cap 110 20)
if [[ $C -gt 30 ]]; then
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s KILL "$C" "${PYTEST[@]}" "${TESTS[@]}" > "$OUT/tests.log" 2>&1
  say "3 tests (precision highest, cap ${C}s): rc=$? $(count "$OUT/tests.log")"
  grep -E " FAILED" "$OUT/tests.log" | head -n 8 | tee -a "$SUMMARY"
else
  say "3 tests: skipped (time)"
fi

# --- 4. the same fp32 checks at the GPU default (TF32) ----------------------------------------------------
C=$(cap 60 5)
if [[ $C -gt 20 ]]; then
  timeout -s KILL "$C" "${PYTEST[@]}" tests/test_model.py tests/test_packing.py \
    "tests/test_hf.py::test_export_scores_match_transformers_and_round_trip" > "$OUT/tests_tf32.log" 2>&1
  say "4 tests (default precision = TF32, cap ${C}s): rc=$? $(count "$OUT/tests_tf32.log")"
  grep -E " FAILED" "$OUT/tests_tf32.log" | head -n 8 | tee -a "$SUMMARY"
else
  say "4 tests_tf32: skipped (time)"
fi

echo "================ summary ($((SECONDS - T0)) s) ================"
cat "$SUMMARY"
