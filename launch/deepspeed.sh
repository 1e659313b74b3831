#!/usr/bin/env bash
# mod-train through the DeepSpeed engine (ZeRO), started by DeepSpeed's own `deepspeed` launcher.
#
#   launch/deepspeed.sh --config configs/gpt-125m-mod.yaml --train.zero_stage=2 [--section.key=value ...]
#   HOSTFILE=hostfile launch/deepspeed.sh --config ...        # several nodes ("host slots=N" lines; ssh)
#
# Environment:
#   NPROC        processes on this node without a hostfile (default: visible GPUs, or 1 on CPU)
#   HOSTFILE     DeepSpeed hostfile for multi-node runs (the launcher reaches the hosts over ssh)
#   MASTER_PORT  rendezvous port (default 29500)
#   MOD_LOG_DIR  where the log goes (default runs/logs): deepspeed-<UTC timestamp>.log
#   PYTHON       interpreter (default: python3 of an active venv, else <repo>/.venv/bin/python if
#                present, else python3 from PATH); the launcher runs as `$PYTHON -m deepspeed.launcher.runner`
# The run uses --train.engine=deepspeed; TP comes from --parallel.tp (megatron-core), ZeRO shards over
# the data-parallel ranks. SIGTERM/SIGINT to this script reach the training processes, which save a
# checkpoint and exit 0 (SIGTERM) like the other launchers.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ -z "${PYTHON:-}" ]; then
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
        PYTHON=$repo/.venv/bin/python
    else
        PYTHON=python3
    fi
fi

if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
LOG_DIR=${MOD_LOG_DIR:-runs/logs}
mkdir -p "$LOG_DIR"
log="$LOG_DIR/deepspeed-$(date -u +%Y%m%dT%H%M%SZ).log"

if [ -n "${HOSTFILE:-}" ]; then
    where=(--hostfile "$HOSTFILE")
else
    where=(--num_gpus "$NPROC")  # one node; no hostfile, so no ssh to localhost
fi
# --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank argument.
cmd=("$PYTHON" -m deepspeed.launcher.runner "${where[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank
     --module mod_megatron.training.cli "$@" --train.engine=deepspeed)
echo "[deepspeed.sh] ${cmd[*]}" | tee "$log"

"${cmd[@]}" > >(tee -a "$log") 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM
trap 'kill -INT $pid 2>/dev/null' INT
while true; do
    wait $pid
    rc=$?
    kill -0 $pid 2>/dev/null || break  # wait returned because a trapped signal arrived: keep waiting
done
echo "[deepspeed.sh] training exited with status $rc" | tee -a "$log"
exit $rc
