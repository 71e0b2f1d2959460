#!/usr/bin/env bash
# Run a whmae entry point on this machine: one process, or N processes joined by
# jax.distributed (one per GPU, or CPU processes with emulated devices).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- extra program args]

Run `python -m MODULE [--config CONFIG] [--workdir WORKDIR] EXTRA...` on this machine.

With --processes N > 1, start N processes that form one JAX job. Each gets
  JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
and writes its output to WORKDIR/logs/rank<i>.log (rank 0's log is also shown
here). On a GPU host each process owns --gpus-per-process GPUs through
CUDA_VISIBLE_DEVICES (process i: GPUs i*G .. i*G+G-1, counted within an inherited
CUDA_VISIBLE_DEVICES if one is set). With --cpu-devices-per-process K the
processes run on CPU (JAX_PLATFORMS=cpu) with K emulated devices each
(XLA_FLAGS=--xla_force_host_platform_device_count=K). The launcher waits for all
processes; when one fails it stops the others and exits with that status.

Options:
  --module NAME                  Python module to run (default: whmae.pretrain)
  --config SPEC                  passed as --config SPEC, e.g. configs/pretrain.py:tiny
  --workdir DIR                  passed as --workdir DIR; required when --processes > 1
  --processes N                  number of processes (default: 1)
  --gpus-per-process G           GPUs per process on a GPU host (default: 1)
  --cpu-devices-per-process K    run on CPU with K emulated devices per process
  --port P                       coordinator port (default: a free port)
  --python CMD                   Python interpreter (default: python)
  --dry-run                      print the commands (with their environment), one per
                                 line, and run nothing
  -h, --help                     show this help

Everything after `--` is passed to the program unchanged.

Examples:
  # CPU, 2 processes x 4 emulated devices = 8 global devices
  launch/local.sh --processes 2 --cpu-devices-per-process 4 \
    --config configs/pretrain.py:tiny --workdir runs/cpu2x4 -- --config.train.steps=10
  # one host with 8 GPUs, one process per GPU
  launch/local.sh --processes 8 --config configs/pretrain.py:base --workdir runs/gpu8
EOF
}

module=whmae.pretrain
config=""
workdir=""
processes=1
gpus_per_process=""
cpu_devices=""
port=""
python=python
dry_run=0
extra=()

while (($#)); do
  if [[ $1 == --?*=* ]]; then # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --module) need_value "$1" $# "${2-}"; module=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --processes) need_value "$1" $# "${2-}"; processes=$2; shift 2 ;;
    --gpus-per-process) need_value "$1" $# "${2-}"; gpus_per_process=$2; shift 2 ;;
    --cpu-devices-per-process) need_value "$1" $# "${2-}"; cpu_devices=$2; shift 2 ;;
    --port) need_value "$1" $# "${2-}"; port=$2; shift 2 ;;
    --python) need_value "$1" $# "${2-}"; python=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (program arguments go after --; see --help)" ;;
  esac
done

[[ -n $module ]] || die "--module must not be empty"
require_int --processes "$processes" 1
[[ -z $cpu_devices ]] || require_int --cpu-devices-per-process "$cpu_devices" 1
[[ -z $gpus_per_process ]] || require_int --gpus-per-process "$gpus_per_process" 1
[[ -z $port ]] || require_int --port "$port" 1
if [[ -n $cpu_devices && -n $gpus_per_process ]]; then
  die "--cpu-devices-per-process (CPU) and --gpus-per-process (GPU) exclude each other"
fi
gpus_per_process=${gpus_per_process:-1}
if ((processes > 1)) && [[ -z $workdir ]]; then
  die "--processes $processes needs --workdir (per-process logs go to WORKDIR/logs)"
fi

# XLA_FLAGS for CPU emulation: inherited flags minus any other device count.
xla_flags=""
if [[ -n $cpu_devices ]]; then
  read -ra inherited <<<"${XLA_FLAGS:-}"
  for flag in ${inherited[@]+"${inherited[@]}"}; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
  done
  xla_flags+="--xla_force_host_platform_device_count=$cpu_devices"
fi

# GPU ids this host offers: the inherited CUDA_VISIBLE_DEVICES list, else 0, 1, ...
gpu_ids=()
if ((processes > 1)) && [[ -z $cpu_devices ]]; then
  needed=$((processes * gpus_per_process))
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpu_ids <<<"$CUDA_VISIBLE_DEVICES"
    if ((${#gpu_ids[@]} < needed)); then
      die "$processes processes x $gpus_per_process GPUs need $needed GPUs," \
        "but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#gpu_ids[@]}"
    fi
  else
    for ((g = 0; g < needed; g++)); do gpu_ids+=("$g"); done
    if ((!dry_run)) && command -v nvidia-smi >/dev/null; then
      found=$(nvidia-smi -L | grep -c '^GPU' || true)
      if ((found < needed)); then
        die "$processes processes x $gpus_per_process GPUs need $needed GPUs; nvidia-smi lists" \
          "$found (for CPU runs use --cpu-devices-per-process K)"
      fi
    fi
  fi
fi

if ((processes > 1)) && [[ -z $port ]]; then
  find_port='import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  port=$("$python" -c "$find_port") ||
    die "could not run '$python' to find a free port (set --python or --port)"
fi

program=("$python" -m "$module")
[[ -z $config ]] || program+=(--config "$config")
[[ -z $workdir ]] || program+=(--workdir "$workdir")
program+=(${extra[@]+"${extra[@]}"})
log_dir=${workdir%/}/logs

# The environment of process $1, one NAME=VALUE per element of rank_env.
set_rank_env() {
  local rank=$1 first
  rank_env=()
  if ((processes > 1)); then
    rank_env+=("JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$processes"
      "JAX_PROCESS_ID=$rank")
  fi
  if [[ -n $cpu_devices ]]; then
    rank_env+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags")
  elif ((processes > 1)); then
    first=$((rank * gpus_per_process))
    local ids=${gpu_ids[*]:first:gpus_per_process}
    rank_env+=("CUDA_VISIBLE_DEVICES=${ids// /,}")
  fi
  # Logs go to files; unbuffered output keeps them current.
  if ((processes > 1)); then rank_env+=("PYTHONUNBUFFERED=1"); fi
}

if ((dry_run)); then
  for ((rank = 0; rank < processes; rank++)); do
    set_rank_env "$rank"
    line=""
    for assignment in ${rank_env[@]+"${rank_env[@]}"}; do line+="$(quote_env "$assignment") "; done
    line+=$(quote_cmd "${program[@]}")
    if ((processes > 1)); then line+=" > $(quote_word "$log_dir/rank$rank.log") 2>&1"; fi
    echo "$line"
  done
  exit 0
fi

if ((processes == 1)); then
  set_rank_env 0
  exec env ${rank_env[@]+"${rank_env[@]}"} "${program[@]}"
fi

mkdir -p "$log_dir"
pids=()
stop_all() {
  local pid tries
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((tries = 0; tries < 50; tries++)); do # up to 10 s to exit cleanly, then SIGKILL
    local alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM
trap stop_all EXIT

for ((rank = 0; rank < processes; rank++)); do
  set_rank_env "$rank"
  : >"$log_dir/rank$rank.log"
  env "${rank_env[@]}" "${program[@]}" >>"$log_dir/rank$rank.log" 2>&1 &
  pids+=($!)
done
echo "local.sh: started $processes processes (coordinator 127.0.0.1:$port); logs in $log_dir" >&2

# Copy rank 0's new log bytes to stdout (portable `tail -f`).
shown=0
show_rank0() {
  local size
  size=$(wc -c <"$log_dir/rank0.log")
  if ((size > shown)); then
    tail -c +$((shown + 1)) "$log_dir/rank0.log" | head -c $((size - shown))
    shown=$size
  fi
}

status=0
running=$processes
finished=()
while ((running > 0)); do
  for ((rank = 0; rank < processes; rank++)); do
    [[ -z ${finished[rank]:-} ]] || continue
    if ! kill -0 "${pids[rank]}" 2>/dev/null; then
      rc=0
      wait "${pids[rank]}" || rc=$?
      finished[rank]=$rc
      running=$((running - 1))
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local.sh: rank $rank exited with status $rc; stopping the others." \
          "Last lines of $log_dir/rank$rank.log:" >&2
        tail -n 20 "$log_dir/rank$rank.log" >&2
        stop_all
      fi
    fi
  done
  show_rank0
  ((running == 0)) || sleep 0.2
done
show_rank0
if ((status == 0)); then
  echo "local.sh: all $processes processes finished; logs in $log_dir" >&2
fi
exit "$status"
