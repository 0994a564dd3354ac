#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (v4, v5e, v5p): create the VM, install this checkout on every worker, run the same
# training command on all workers (they join one JAX job; jaxreward detects the pod), stream the logs, delete the VM.
#
#   launch/tpu_vm.sh --name rm-8b --zone us-east5-a --accelerator-type v5p-64 \
#       --config configs/large.py --workdir /mnt/shared/runs/large [--version RUNTIME] [--project P] [--spot] \
#       [--keep] [--dry-run] [-- --config.model.init_from=/mnt/shared/Llama-3-8B ...]
#   launch/tpu_vm.sh --delete --name rm-8b --zone us-east5-a        # only delete the VM
#
# --workdir must be storage every worker sees (a Filestore / gcsfuse mount): orbax writes each checkpoint
# collectively from all hosts, and a re-run with the same --workdir resumes. A preempted (spot) run exits 4; run the
# same command again. The VM is deleted when training ends, whatever its result, unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" SPOT=0 KEEP=0 DELETE_ONLY=0 DRY_RUN=0
PYTHON=python3.11
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$1" "$#"; NAME="$2"; shift 2 ;;
    --zone) need_value "$1" "$#"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need_value "$1" "$#"; TYPE="$2"; shift 2 ;;
    --version) need_value "$1" "$#"; VERSION="$2"; shift 2 ;;
    --project) need_value "$1" "$#"; PROJECT="$2"; shift 2 ;;
    --config) need_value "$1" "$#"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "$#"; WORKDIR="$2"; shift 2 ;;
    --python) need_value "$1" "$#"; PYTHON="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --keep) KEEP=1; shift ;;
    --delete) DELETE_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see the header of launch/tpu_vm.sh)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-', starting with a letter"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-central2-b for v4, us-east5-a for v5p, us-west4-a for v5e)"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone like us-central2-b"
GCLOUD_FLAGS=(--zone "$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_FLAGS+=(--project "$PROJECT")
[[ "$DRY_RUN" == 1 ]] || command -v gcloud > /dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"

if [[ "$DELETE_ONLY" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  exit 0
fi

[[ -n "$TYPE" ]] || die "--accelerator-type is required (v4-N, v5litepod-N for v5e, v5p-N)"
case "$TYPE" in
  v4-*) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
  v5litepod-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  *) DEFAULT_VERSION="" ;;
esac
[[ "$TYPE" =~ ^(v4|v5litepod|v5p)-[0-9]+$ && -n "$DEFAULT_VERSION" ]] ||
  die "--accelerator-type '$TYPE': expected v4-N, v5litepod-N (v5e) or v5p-N"
VERSION="${VERSION:-$DEFAULT_VERSION}"
[[ -n "$CONFIG" ]] || die "--config is required (e.g. configs/large.py)"
[[ -f "$CONFIG" ]] || die "--config '$CONFIG' does not exist"
[[ -n "$WORKDIR" ]] || die "--workdir is required (storage shared by all workers)"

CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type "$TYPE" --version "$VERSION")
[[ "$SPOT" == 0 ]] || CREATE+=(--spot)
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all)
ARCHIVE="/tmp/jaxreward-$NAME.tar.gz"
LOG="logs/$NAME.log"
TRAIN="cd ~/jaxreward && ~/venv/bin/python -m jaxreward.main --config $CONFIG --workdir $WORKDIR"
for flag in "${EXTRA[@]}"; do TRAIN+=" $(printf '%q' "$flag")"; done

run "${CREATE[@]}"
# The checkout as committed (git archive), so every worker runs the same code.
run git archive --format=tar.gz --output "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:jaxreward.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
# TPU VM images ship Python 3.10; the project needs 3.11 (Ubuntu 22.04 has it in universe).
run "${SSH[@]}" --command "sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv && \
rm -rf ~/jaxreward && mkdir -p ~/jaxreward && tar xzf ~/jaxreward.tar.gz -C ~/jaxreward && \
$PYTHON -m venv ~/venv && ~/venv/bin/pip install -q -e ~/jaxreward 'jax[tpu]'"
# All workers run the same command; output of every worker streams here and into $LOG.
echo "$(show "${SSH[@]}" --command "$TRAIN") 2>&1 | tee $LOG"
STATUS=0
if [[ "$DRY_RUN" == 0 ]]; then
  mkdir -p logs
  set +e  # The VM is deleted below whatever training returned.
  "${SSH[@]}" --command "$TRAIN" 2>&1 | tee "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
fi
if [[ "$KEEP" == 0 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
else
  echo "kept $NAME; delete it with: launch/tpu_vm.sh --delete --name $NAME --zone $ZONE"
fi
exit "$STATUS"
