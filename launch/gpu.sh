#!/usr/bin/env bash
# Trains on a local NVIDIA GPU box: a venv with this checkout and jax[cuda12], a GPU check, the memory estimate,
# then the run.
#
#   launch/gpu.sh --config configs/medium.py --workdir runs/medium [--venv .venv-gpu] [--cuda 12] \
#       [--jax-version 0.10.2] [--skip-install] [--dry-run] [-- --config.model.init_from=/models/Llama-3.2-1B-Instruct ...]
#
# configs/small.py runs on any GPU; configs/medium.py wants one 80 GB GPU (see its docstring) and an SFT model
# via --config.model.init_from. Re-running with the same --workdir resumes; exit 4 means it was stopped (SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

CONFIG="" WORKDIR="" VENV=.venv-gpu CUDA=12 SKIP_INSTALL=0 DRY_RUN=0 PYTHON=python3.11 JAX_VERSION=0.10.2
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$1" "$#"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "$#"; WORKDIR="$2"; shift 2 ;;
    --venv) need_value "$1" "$#"; VENV="$2"; shift 2 ;;
    --cuda) need_value "$1" "$#"; CUDA="$2"; shift 2 ;;
    --python) need_value "$1" "$#"; PYTHON="$2"; shift 2 ;;
    --jax-version) need_value "$1" "$#"; JAX_VERSION="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see the header of launch/gpu.sh)" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "--config is required (configs/small.py or configs/medium.py)"
[[ -f "$CONFIG" ]] || die "--config '$CONFIG' does not exist"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$CUDA" == 12 || "$CUDA" == 13 ]] || die "--cuda '$CUDA': expected 12 or 13"
[[ -n "$VENV" ]] || die "--venv must not be empty"

if [[ "$SKIP_INSTALL" == 0 ]]; then
  run "$PYTHON" -m venv "$VENV"
  # Pinned: the CUDA plugin wheels follow jax's version, and a re-run must compute with the same stack.
  run "$VENV/bin/pip" install -q -e . "jax[cuda$CUDA]==$JAX_VERSION"
fi
# Fail before any data work when JAX cannot see a GPU (driver or CUDA wheel mismatch).
run "$VENV/bin/python" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
run "$VENV/bin/python" tools/memory.py --config "$CONFIG" "${EXTRA[@]}"
run "$VENV/bin/python" -m jaxreward.main --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}"
