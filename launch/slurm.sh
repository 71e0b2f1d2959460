#!/usr/bin/env bash
# Render launch/slurm/whmae.sbatch for one whmae run and submit it with sbatch.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --workdir DIR [options] [-- extra program args]

Render the SLURM batch script launch/slurm/whmae.sbatch for
`python -m MODULE --config CONFIG --workdir DIR EXTRA...`, write it to
DIR/JOB_NAME.sbatch (or --script) and submit it with `sbatch --parsable`.
The job activates --venv, then runs one `srun --kill-on-bad-exit=1` step; every task
writes DIR/logs/JOB_NAME-JOBID-RANK.log (the batch script's own output goes to
DIR/logs/JOB_NAME-JOBID.log). The program joins the job through JAX's SLURM
autodetection (SLURM_NTASKS > 1). DIR must be on a filesystem all nodes share.

Options:
  --workdir DIR          run directory (required; made absolute)
  --module NAME          Python module to run (default: whmae.pretrain)
  --config SPEC          passed as --config SPEC, e.g. configs/pretrain.py:base
  --account NAME         #SBATCH --account (omitted when not given)
  --partition NAME       #SBATCH --partition (omitted when not given)
  --nodes N              #SBATCH --nodes (default: 1)
  --gpus-per-node G      #SBATCH --gpus-per-node (default: 8; 0 = CPU-only nodes)
  --tasks-per-node T     1 or "node": one process per node owning all its GPUs (default);
                         "gpu" or G: one process per GPU
  --cpus-per-task C      #SBATCH --cpus-per-task (omitted when not given)
  --time HH:MM:SS        #SBATCH --time (default: 01:00:00)
  --job-name NAME        #SBATCH --job-name (default: whmae)
  --sbatch-option OPT    one more `#SBATCH OPT` line, e.g. --sbatch-option=--qos=high
                         (repeatable)
  --venv PATH            virtual environment to activate in the job (PATH/bin/activate)
  --template FILE        batch script template (default: launch/slurm/whmae.sbatch)
  --script FILE          where to write the rendered script (default: DIR/JOB_NAME.sbatch)
  --dry-run              print the rendered script and the sbatch command; submit nothing
  -h, --help             show this help

Everything after `--` is passed to the program unchanged.

Example (4 nodes x 8 GPUs, one process per GPU = 32 processes):
  launch/slurm.sh --account my_acct --partition gpu --nodes 4 --gpus-per-node 8 \
    --tasks-per-node gpu --time 24:00:00 --venv $PWD/.venv \
    --config configs/pretrain.py:base --workdir /shared/runs/base-32gpu \
    -- --config.data.dir=/shared/data/ukb
EOF
}

launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
module=whmae.pretrain
config=""
workdir=""
account=""
partition=""
nodes=1
gpus_per_node=8
tasks_per_node=1
cpus_per_task=""
time_limit=01:00:00
job_name=whmae
sbatch_options=()
venv=""
template=$launch_dir/slurm/whmae.sbatch
script=""
dry_run=0
extra=()

while (($#)); do
  if [[ $1 == --?*=* ]]; then # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --module) need_value "$1" $# "${2-}"; module=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --account) need_value "$1" $# "${2-}"; account=$2; shift 2 ;;
    --partition) need_value "$1" $# "${2-}"; partition=$2; shift 2 ;;
    --nodes) need_value "$1" $# "${2-}"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" $# "${2-}"; gpus_per_node=$2; shift 2 ;;
    --tasks-per-node) need_value "$1" $# "${2-}"; tasks_per_node=$2; shift 2 ;;
    --cpus-per-task) need_value "$1" $# "${2-}"; cpus_per_task=$2; shift 2 ;;
    --time) need_value "$1" $# "${2-}"; time_limit=$2; shift 2 ;;
    --job-name) need_value "$1" $# "${2-}"; job_name=$2; shift 2 ;;
    --sbatch-option) need_value "$1" $# "${2-}"; sbatch_options+=("$2"); shift 2 ;;
    --venv) need_value "$1" $# "${2-}"; venv=$2; shift 2 ;;
    --template) need_value "$1" $# "${2-}"; template=$2; shift 2 ;;
    --script) need_value "$1" $# "${2-}"; script=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (program arguments go after --; see --help)" ;;
  esac
done

[[ -n $workdir ]] || die "--workdir is required (a directory on a filesystem all nodes share)"
[[ $workdir != *://* ]] || die "--workdir $workdir: SLURM needs a shared filesystem path, not a URL"
[[ $workdir =~ ^[^[:space:]]+$ ]] || die "--workdir '$workdir' must not contain whitespace"
[[ -n $module ]] || die "--module must not be empty"
require_int --nodes "$nodes" 1
require_int --gpus-per-node "$gpus_per_node" 0
[[ -z $cpus_per_task ]] || require_int --cpus-per-task "$cpus_per_task" 1
[[ $time_limit =~ ^[0-9:-]+$ ]] || die "--time must look like HH:MM:SS or D-HH:MM:SS: '$time_limit'"
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name '$job_name': letters, digits, _ . - only"
for name in account partition; do
  [[ ${!name} =~ ^[^[:space:]]*$ ]] || die "--$name '${!name}' must not contain whitespace"
done
for option in ${sbatch_options[@]+"${sbatch_options[@]}"}; do
  [[ $option == -* ]] || die "--sbatch-option '$option' must be an sbatch option such as --qos=high"
done
[[ -f $template ]] || die "template $template not found"

# Per node (1 task) or per GPU (G tasks); per-node tasks must see all the node's GPUs.
local_device_ids=""
case $tasks_per_node in
  1 | node) tasks_per_node=1 ;;
  gpu | "$gpus_per_node") tasks_per_node=$gpus_per_node ;;
  *) die "--tasks-per-node must be 1/node (one per node) or gpu/$gpus_per_node (one per GPU)," \
    "got '$tasks_per_node'" ;;
esac
if ((gpus_per_node == 0)); then
  tasks_per_node=1
elif ((tasks_per_node == 1)); then
  local_device_ids=$(seq -s, 0 $((gpus_per_node - 1)))
fi

[[ $workdir == /* ]] || workdir=$PWD/$workdir
workdir=${workdir%/}
log_dir=$workdir/logs
script=${script:-$workdir/$job_name.sbatch}
if [[ -n $venv && $venv != /* ]]; then venv=$PWD/$venv; fi
if ((!dry_run)) && [[ -n $venv && ! -f $venv/bin/activate ]]; then
  die "--venv $venv has no bin/activate"
fi

program_args=()
[[ -z $config ]] || program_args+=(--config "$config")
program_args+=(--workdir "$workdir" ${extra[@]+"${extra[@]}"})
extra_lines=""
for option in ${sbatch_options[@]+"${sbatch_options[@]}"}; do
  extra_lines+="${extra_lines:+$'\n'}#SBATCH $option"
done

# Values for the template's @NAME@ placeholders; shell-quoted where the script body uses them.
declare -A values=(
  [JOB_NAME]=$job_name [ACCOUNT]=$account [PARTITION]=$partition [NODES]=$nodes
  [TASKS_PER_NODE]=$tasks_per_node [CPUS_PER_TASK]=$cpus_per_task [TIME]=$time_limit
  [CHDIR]=$PWD [LOG_DIR]=$log_dir [SBATCH_OPTIONS]=$extra_lines
  [GPUS_PER_NODE]=$gpus_per_node
  [VENV]=$(quote_word "$venv") [MODULE]=$(quote_word "$module")
  [ARGS]=$(quote_cmd "${program_args[@]}") [LOG_DIR_QUOTED]=$(quote_word "$log_dir")
  [LOCAL_DEVICE_IDS]=$local_device_ids
)
((gpus_per_node > 0)) || values[GPUS_PER_NODE]=""
optional=" ACCOUNT PARTITION GPUS_PER_NODE CPUS_PER_TASK SBATCH_OPTIONS LOCAL_DEVICE_IDS "

render() {
  local line key keep
  while IFS= read -r line || [[ -n $line ]]; do
    keep=1
    for key in "${!values[@]}"; do
      [[ $line == *"@$key@"* ]] || continue
      if [[ -z ${values[$key]} && $optional == *" $key "* ]]; then
        keep=0
      else
        line=${line//"@$key@"/"${values[$key]}"}
      fi
    done
    if ((keep)); then printf '%s\n' "$line"; fi
  done <"$template"
}

rendered=$(render)
if [[ $rendered =~ @[A-Z_]+@ ]]; then
  die "template $template has a placeholder slurm.sh does not know: ${BASH_REMATCH[0]}"
fi
submit=(sbatch --parsable "$script")

if ((dry_run)); then
  printf '%s\n' "$rendered"
  echo "# sbatch command (not run: --dry-run):"
  quote_cmd "${submit[@]}"
  echo
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found on PATH (run this on a SLURM login node)"
mkdir -p "$log_dir" "$(dirname "$script")"
printf '%s\n' "$rendered" >"$script"
job_id=$("${submit[@]}") || die 1 "sbatch rejected $script"
echo "slurm.sh: submitted job $job_id ($nodes nodes x $tasks_per_node tasks); script $script;" \
  "logs $log_dir/$job_name-${job_id%%;*}-<rank>.log"
