#!/usr/bin/env bash
# MoD GPT pretraining on this machine: torchrun --standalone, one process per GPU (or NPROC).
#
#   launch/local.sh --config configs/tiny-cpu.yaml [--section.key=value ...]
#   NPROC=2 launch/local.sh --config configs/tiny-cpu.yaml --train.micro_batch_size=8   # DP=2
#
# Arguments go to mod-train unchanged. Output is shown and appended to
# ${MOD_LOG_DIR:-runs/logs}/local-<UTC timestamp>.log (relative to the current directory: run from
# the repository root, like the configs' relative paths expect). Exits with the training's status.
#
# Environment:
#   NPROC        processes (default: visible GPUs -- CUDA_VISIBLE_DEVICES or nvidia-smi -- or 1 on CPU)
#   PYTHON       interpreter (default: python3 of an active venv, else <repo>/.venv/bin/python if
#                present, else python3 from PATH)
#   MOD_LOG_DIR  log directory (default runs/logs)
#
# Signals: SIGTERM / SIGUSR1 to this script are passed to the training processes, which save a
# checkpoint and exit 0 (then this script exits 0); Ctrl-C (SIGINT) stops torchrun and its workers
# without a checkpoint. torchrun itself ignores TERM/USR1 so that its exit status is the workers'.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${PYTHON:-}" ]; then
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
        PYTHON=$repo/.venv/bin/python
    else
        PYTHON=python3
    fi
fi

gpu_count() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in '' | -1 | NoDevFiles) echo 0; return ;; esac
        local IFS=,
        # shellcheck disable=SC2086
        set -- $CUDA_VISIBLE_DEVICES
        echo $#
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [ -z "${NPROC:-}" ]; then
    NPROC=$(gpu_count)
    [ "${NPROC:-0}" -gt 0 ] 2>/dev/null || NPROC=1
fi

log_dir=${MOD_LOG_DIR:-runs/logs}
mkdir -p "$log_dir" || exit 1
log=$log_dir/local-$(date -u +%Y%m%d-%H%M%S).log

tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
mkfifo "$tmp/out" || exit 1

# tee ignores the signals meant for the training so that no line of its shutdown is lost.
(trap '' INT TERM USR1; exec tee -a "$log" <"$tmp/out") &
tee_pid=$!

echo "[local.sh] $NPROC process(es) | $(command -v "$PYTHON" || echo "$PYTHON") | log $log" | tee -a "$log"

(
    trap '' TERM USR1
    exec env PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT "$PYTHON" -m torch.distributed.run \
        --standalone --nproc_per_node="$NPROC" -m mod_megatron.training.cli "$@"
) >"$tmp/out" 2>&1 &
pid=$!

# torchrun starts its workers in their own session: signals for them must be sent to them directly.
# shellcheck disable=SC2317  # called from the traps below
forward() {
    local kids
    kids=$(pgrep -P "$pid" 2>/dev/null || ps -o pid= --ppid "$pid" 2>/dev/null)
    if [ -n "$kids" ]; then
        # shellcheck disable=SC2086
        kill -s "$1" $kids 2>/dev/null
    fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap ':' INT # Ctrl-C reaches torchrun directly (same process group); keep waiting for its status

while :; do
    wait "$pid"
    rc=$?
    # wait returns > 128 when a trapped signal interrupts it: go on waiting while torchrun runs.
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then
        continue
    fi
    break
done
if [ "$rc" -gt 128 ]; then
    wait "$pid" 2>/dev/null
    r=$?
    [ "$r" -ne 127 ] && rc=$r
fi
wait "$tee_pid" 2>/dev/null
echo "[local.sh] training exited with status $rc" | tee -a "$log"
exit "$rc"
