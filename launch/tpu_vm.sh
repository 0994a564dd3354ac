#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (v4, v5e, v5p): create the VM, install this checkout on every worker, start the same
# training command on all workers (they join one JAX job through jax.distributed), stream the logs, collect every
# worker's exit code, delete the VM.
#
#   launch/tpu_vm.sh --name rm-8b --zone us-east5-a --accelerator-type v5p-64 \
#       --config configs/large.py --workdir /mnt/shared/runs/large [--version RUNTIME] [--project P] [--spot] \
#       [--jax-version 0.10.2] [--compile-cache DIR|none] [--keep] [--dry-run] \
#       [-- --config.model.init_from=/mnt/shared/Llama-3-8B ...]
#   launch/tpu_vm.sh --attach --name rm-8b --zone us-east5-a [--keep]   # re-attach after a dropped connection
#   launch/tpu_vm.sh --delete --name rm-8b --zone us-east5-a            # only delete the VM
#
# --workdir must be storage every worker sees (a Filestore / gcsfuse mount, or gs://): orbax writes each checkpoint
# collectively from all hosts, and a re-run with the same --workdir resumes. Training runs detached on the workers
# (launch/tpu_worker.sh: setsid nohup, log and exit code in ~/jaxreward-run/), so a dropped ssh connection or a
# closed laptop does not stop it: run `--attach` to follow it again. A preempted (spot) run exits 4; run the same
# command again. The VM is deleted once every worker has an exit code, whatever it is, unless --keep.
# XLA's compilation cache defaults to DIR = the work dir's parent + /xla_cache (shared storage), so a re-run or a
# preempted-and-restarted pod skips the minutes an 8B step takes to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" SPOT=0 KEEP=0 DELETE_ONLY=0 ATTACH=0 DRY_RUN=0
PYTHON=python3.11 JAX_VERSION=0.10.2 CACHE="" FOLLOW_TRIES=20
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
    --jax-version) need_value "$1" "$#"; JAX_VERSION="$2"; shift 2 ;;
    --compile-cache) need_value "$1" "$#"; CACHE="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --keep) KEEP=1; shift ;;
    --delete) DELETE_ONLY=1; shift ;;
    --attach) ATTACH=1; shift ;;
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

SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all)
WORKER=(launch/tpu_worker.sh)
LOG="logs/$NAME.log"

delete_vm() {
  if [[ "$KEEP" == 0 ]]; then
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  else
    echo "kept $NAME; delete it with: launch/tpu_vm.sh --delete --name $NAME --zone $ZONE"
  fi
}

# Streams every worker's log until all have finished (re-connecting when ssh drops), then reads each worker's exit
# code. Exit status: the first non-zero worker code, 0 when all are 0. The VM is deleted only when every worker
# has finished: a job still running after FOLLOW_TRIES lost connections is left alone, with the command to re-attach.
follow_and_finish() {
  local try status_lines codes code
  echo "$(show "${SSH[@]}" --command "cd ~/jaxreward && $(show "${WORKER[@]}" follow | cut -c3-)") 2>&1 | tee -a $LOG"
  echo "$(show "${SSH[@]}" --command "cd ~/jaxreward && $(show "${WORKER[@]}" status | cut -c3-)")"
  [[ "$DRY_RUN" == 0 ]] || { delete_vm; return 0; }
  mkdir -p logs
  for ((try = 1; try <= FOLLOW_TRIES; try++)); do
    "${SSH[@]}" --command "cd ~/jaxreward && ${WORKER[*]} follow" 2>&1 | tee -a "$LOG"
    status_lines=$("${SSH[@]}" --command "cd ~/jaxreward && ${WORKER[*]} status" 2> /dev/null | grep '^worker ')
    echo "$status_lines"
    if [[ -n "$status_lines" ]] && ! grep -qE ' (running|absent)$' <<< "$status_lines"; then
      codes=$(sed -nE 's/^worker .* exit ([0-9]+)$/\1/p' <<< "$status_lines")
      code=0
      for c in $codes; do [[ "$c" == 0 || "$code" != 0 ]] || code=$c; done
      delete_vm
      return "$code"
    fi
    grep -q ' absent$' <<< "$status_lines" && break
    echo "connection to the workers lost while training runs; re-connecting ($try/$FOLLOW_TRIES)" >&2
    sleep 10
  done
  echo "error: not every worker finished (see above); the VM is kept. Follow again with:" \
       "launch/tpu_vm.sh --attach --name $NAME --zone $ZONE" >&2
  return 1
}

# A closed terminal must not stop the launcher halfway (e.g. between training's end and the VM's deletion).
trap '' HUP

if [[ "$DELETE_ONLY" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  exit 0
fi
if [[ "$ATTACH" == 1 ]]; then
  follow_and_finish
  exit $?
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
[[ "$JAX_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--jax-version '$JAX_VERSION': expected a version like 0.10.2"
[[ -n "$CACHE" ]] || CACHE="$(dirname "$WORKDIR")/xla_cache"

CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type "$TYPE" --version "$VERSION")
[[ "$SPOT" == 0 ]] || CREATE+=(--spot)
ARCHIVE="/tmp/jaxreward-$NAME.tar.gz"
# Every worker joins one jax.distributed job (a coordination service: a crashed host makes the others stop
# instead of hanging in a collective, and SIGTERM preemption is agreed on by all hosts); JAX finds the coordinator
# in the TPU VM's metadata.
ARGS=(--config "$CONFIG" --workdir "$WORKDIR" --config.distributed.initialize=yes)
[[ "$CACHE" == none ]] || ARGS+=("--config.train.compilation_cache=$CACHE")
ARGS+=("${EXTRA[@]}")
START="cd ~/jaxreward && ${WORKER[*]} start --"
for word in "${ARGS[@]}"; do START+=" $(printf '%q' "$word")"; done

run "${CREATE[@]}"
# The checkout as committed (git archive), so every worker runs the same code.
run git archive --format=tar.gz --output "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:jaxreward.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
# TPU VM images ship Python 3.10; the project needs 3.11 (Ubuntu 22.04 has it in universe). jax is pinned (its
# [tpu] extra pins the matching libtpu) so every worker, and every re-run, computes with the same stack.
run "${SSH[@]}" --command "sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv && \
rm -rf ~/jaxreward && mkdir -p ~/jaxreward && tar xzf ~/jaxreward.tar.gz -C ~/jaxreward && \
$PYTHON -m venv ~/venv && ~/venv/bin/pip install -q -e ~/jaxreward 'jax[tpu]==$JAX_VERSION'"
run "${SSH[@]}" --command "$START"
follow_and_finish
exit $?
