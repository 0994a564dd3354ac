#!/usr/bin/env bash
# Runs on every TPU VM worker (launch/tpu_vm.sh calls it over ssh). Training runs detached from the ssh session, so
# a dropped connection (SIGHUP) cannot kill it; its log and exit code stay in files the launcher reads back.
#
#   launch/tpu_worker.sh start -- ARGS...   # starts `python -m jaxreward.main ARGS` detached; returns at once
#   launch/tpu_worker.sh follow             # streams the log until training ends; exits with its exit code
#   launch/tpu_worker.sh status             # one line: "worker HOST exit N", "worker HOST running" or "... absent"
#
# Files (one set per worker, in $JAXREWARD_RUN_DIR, default ~/jaxreward-run): train.log, train.exit, train.pid.
set -uo pipefail
RUN_DIR="${JAXREWARD_RUN_DIR:-$HOME/jaxreward-run}"
PYTHON="${JAXREWARD_PYTHON:-$HOME/venv/bin/python}"
LOG="$RUN_DIR/train.log" EXIT_FILE="$RUN_DIR/train.exit" PID_FILE="$RUN_DIR/train.pid"

die() {
  echo "error: $*" >&2
  exit 2
}

case "${1:-}" in
  start)
    shift
    [[ "${1:-}" == "--" ]] && shift
    mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"
    if [[ -f "$PID_FILE" && ! -f "$EXIT_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
      die "training already runs on $(hostname) (pid $(cat "$PID_FILE")); follow it with: $0 follow"
    fi
    rm -f "$EXIT_FILE"
    # setsid: a session of its own (no controlling terminal, so no SIGHUP from ssh); nohup for the shell itself.
    setsid nohup bash -c '
      "$0" -m jaxreward.main "$@"
      code=$?
      echo "$code" > "'"$EXIT_FILE"'.tmp" && mv "'"$EXIT_FILE"'.tmp" "'"$EXIT_FILE"'"' \
      "$PYTHON" "$@" > "$LOG" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    echo "worker $(hostname) started pid $(cat "$PID_FILE"); log $LOG"
    ;;
  follow)
    [[ -f "$PID_FILE" ]] || die "no training was started on $(hostname) (no $PID_FILE)"
    tail -n +1 -F "$LOG" 2> /dev/null &
    tail_pid=$!
    # The exit file is written when training ends; a worker that vanished without one (VM restart, kill -9 of the
    # shell) is reported instead of waited on forever.
    while [[ ! -f "$EXIT_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; do sleep 5; done
    sleep 1
    kill "$tail_pid" 2> /dev/null
    [[ -f "$EXIT_FILE" ]] || { echo "worker $(hostname): training ended without an exit code (killed?)"; exit 1; }
    exit "$(cat "$EXIT_FILE")"
    ;;
  status)
    if [[ -f "$EXIT_FILE" ]]; then
      echo "worker $(hostname) exit $(cat "$EXIT_FILE")"
    elif [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
      echo "worker $(hostname) running"
    else
      echo "worker $(hostname) absent"
    fi
    ;;
  *)
    die "usage: $0 start -- ARGS... | follow | status"
    ;;
esac
