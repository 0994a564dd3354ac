#!/usr/bin/env bash
# jaxreward on one NVIDIA GPU (H100/H200), from a bare offline machine, in one command of <= 8 minutes:
#
#   bash tools/gpu_check.sh          # from the project root; results under $OUT (else ./gpu-check-out)
#   STAGES="1 3 4" bash tools/gpu_check.sh   # only some stages (0 always runs)
#
# Needs the wheels the GPU image lacks in .whl/ (run ../shared/device/prepare-wheels.sh on a machine with a
# registry first, and add tensorboardX for the end-to-end stage: `python3 -m pip download --no-deps -d .whl
# tensorboardX==2.6.4`); the image's own jax (CUDA), flax, optax, orbax, torch and transformers are used as they are.
# Measured on an H100 (README "Performance"): the tests compile slowly there, so one run does not reach every
# test; STAGES="1 3 4" reruns the test stages alone.
# At most 8 files land in $OUT (what the device tool brings back). Stages, each capped so that the later ones
# still run (DEADLINE seconds in all; a stage that ends early leaves its time to the next):
#   0  env.txt         GPU, driver, versions, cuDNN
#   1  attention.log   tests/test_attention.py: cuDNN (unpacked, packed, shared-prompt rows) and 'auto' vs the
#                      fp32 reference, blockwise vs the reference, under JAX_DEFAULT_MATMUL_PRECISION=highest
#   2  bench.log/json  tools/train_bench.py: d 2048, 4 layers, bf16, rows of 2,048 tokens, unpacked vs packed x
#                      cudnn / xla / blockwise: step time, real tokens/s, MFU over 989 TFLOP/s, memory
#   p  pulse.log       the product end to end: configs/small.py in bf16 (auto = cuDNN on packed rows), its
#                      validation accuracy and quality gate
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
STAGES=${STAGES:-1 2 p 3 4}  # e.g. STAGES="1 3" reruns the attention and test stages only
T0=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "[$((SECONDS - T0))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }

# --- 0. environment ---------------------------------------------------------------------------------------
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxreward-site .whl/*.whl > /tmp/install.log 2>&1 \
    || say "WARNING: installing .whl/ failed: $(tail -n 3 /tmp/install.log)"
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
# Each failure's traceback as it happens (a capped stage never reaches pytest's final report).
export PYTHONPATH=$PYTHONPATH:$PWD/tools
PYTEST=($PY -m pytest -v --tb=short -p no:cacheprovider -p pytest_print_failures)
# Verdicts: "path::test PASSED [ n%]", or with -s the test's own print then the verdict on a line of its own.
verdicts() { grep -cE "^$2( +\[ *[0-9]+%\])?\$|::[^ ]+ $2( |\$)" "$1"; }
count() { echo "$(verdicts "$1" PASSED) passed, $(verdicts "$1" FAILED) failed, $(verdicts "$1" SKIPPED) skipped"; }

# Stage caps in seconds, in the order the stages run. When time is short each stage gets its share of what is left.
ORDER=(1a 1b 2 p 3 4)
declare -A CAP=([1a]=150 [1b]=45 [2]=100 [p]=40 [3]=150 [4]=60)
wanted() { [[ " $STAGES " == *" ${1:0:1} "* ]]; }
stage_cap() {  # stage_cap NAME: its cap, or its share (cap / (cap + later wanted caps)) of the time left if less
  local reserve=0 after=0 s
  for s in "${ORDER[@]}"; do
    [[ $after == 1 ]] && wanted "$s" && reserve=$((reserve + CAP[$s]))
    [[ $s == "$1" ]] && after=1
  done
  local share=$(( $(left) * CAP[$1] / (CAP[$1] + reserve) ))
  [[ $share -lt ${CAP[$1]} ]] && echo "$share" || echo "${CAP[$1]}"
}
# A cap under 10 s skips the stage (and `timeout 0` would mean no limit at all).
short() { [[ $2 -lt 10 ]] && say "$1 skipped: no time left"; }

# --- 1. attention kernels vs the reference: the GPU kernels first, then the portable ones on the GPU ----------
if wanted 1; then
  C=$(stage_cap 1a)
  if ! short 1a "$C"; then
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s KILL "$C" "${PYTEST[@]}" -s tests/test_attention.py \
      -k "cudnn or auto" > "$OUT/attention.log" 2>&1
    say "1a cuDNN + auto vs the reference (precision highest, cap ${C}s): rc=$? $(count "$OUT/attention.log")"
  fi
  C=$(stage_cap 1b)
  if ! short 1b "$C"; then
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s KILL "$C" "${PYTEST[@]}" tests/test_attention.py \
      -k "not (cudnn or auto)" >> "$OUT/attention.log" 2>&1
    say "1 attention, all (cap ${C}s for the rest): rc=$? $(count "$OUT/attention.log")"
  fi
  grep -E "::[^ ]+ FAILED|max \|error\||^----- failure of" "$OUT/attention.log" | head -n 12 | tee -a "$SUMMARY"
fi

# --- 2. train-step benchmark ------------------------------------------------------------------------------
if wanted 2; then
  C=$(stage_cap 2)
  if ! short 2 "$C"; then
    timeout -s KILL "$C" $PY tools/train_bench.py --steps 4 --warmup 1 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
    say "2 bench (cap ${C}s): rc=$?"
    grep -E "^(model|[UP]-|[0-9]+ x)" "$OUT/bench.log" | tee -a "$SUMMARY"
  fi
fi

# --- p. the product end to end ------------------------------------------------------------------------------
if wanted p; then
  C=$(stage_cap p)
  if ! short p "$C"; then
    timeout -s KILL "$C" $PY -m jaxreward.main --config configs/small.py --workdir /tmp/gpu-pulse \
      --config.model.dtype=bfloat16 > "$OUT/pulse.log" 2>&1
    say "p pulse: configs/small.py bf16 (cap ${C}s): rc=$? $(grep -oE 'attention [^,;]*|Quality gate: [A-Z]+' \
      "$OUT/pulse.log" | sort -u | tr '\n' ' ')"
    grep -E "val acc" "$OUT/pulse.log" | tail -n 1 | tee -a "$SUMMARY"
  fi
fi

# --- 3. GPU-relevant tests at full fp32 precision (HF parity first) ----------------------------------------
TESTS=("tests/test_hf.py::test_import_matches_transformers_hidden_states"
       "tests/test_hf.py::test_export_scores_match_transformers_and_round_trip"
       "tests/test_train.py::test_gradient_accumulation_equals_the_big_batch"
       "tests/test_train.py::test_non_finite_step_leaves_the_state_untouched"
       tests/test_loss.py tests/test_packing.py tests/test_model.py)
if wanted 3; then
  C=$(stage_cap 3)
  if ! short 3 "$C"; then
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s KILL "$C" "${PYTEST[@]}" "${TESTS[@]}" > "$OUT/tests.log" 2>&1
    say "3 tests (precision highest, cap ${C}s): rc=$? $(count "$OUT/tests.log")"
    grep -E "::[^ ]+ FAILED|^----- failure of|^E  " "$OUT/tests.log" | head -n 16 | tee -a "$SUMMARY"
  fi
fi

# --- 4. the same fp32 checks at the GPU default (TF32) ----------------------------------------------------
if wanted 4; then
  C=$(stage_cap 4)
  if ! short 4 "$C"; then
    timeout -s KILL "$C" "${PYTEST[@]}" "tests/test_hf.py::test_export_scores_match_transformers_and_round_trip" \
      tests/test_packing.py tests/test_model.py > "$OUT/tests_tf32.log" 2>&1
    say "4 tests (default precision = TF32, cap ${C}s): rc=$? $(count "$OUT/tests_tf32.log")"
    grep -E "::[^ ]+ FAILED|^----- failure of|^E  " "$OUT/tests_tf32.log" | head -n 16 | tee -a "$SUMMARY"
  fi
fi

echo "================ summary ($((SECONDS - T0)) s) ================"
cat "$SUMMARY"
