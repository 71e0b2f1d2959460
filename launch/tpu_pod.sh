#!/usr/bin/env bash
# Remote commands are single-quoted on purpose: $HOME and friends expand on the workers.
# shellcheck disable=SC2016
# Create a Cloud TPU VM slice, install whmae on every worker, run one program on all workers
# (one JAX process per worker), and tear the slice down.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- extra program args]

Subcommands:
  create   gcloud compute tpus tpu-vm create NAME (with --reuse: only if `describe` fails)
  setup    ship `git archive REF` of this repository to every worker (scp --worker=all),
           then on every worker: a Python venv (uv fetches Python 3.11 if needed),
           pip install -U JAX_SPEC, pip install -e the project
  run      on every worker (ssh --worker=all): python -m MODULE --config CONFIG
           --workdir WORKDIR --config.data.dir=DATA_DIR EXTRA...; output streams here,
           each worker also tees it to ~/whmae-logs/worker<i>.log and copies that to
           WORKDIR/logs/worker<i>-<time>.log when the program ends
  delete   gcloud compute tpus tpu-vm delete NAME --quiet
  all      create -> setup -> run -> delete; deletes the slice on failure or interrupt
           too (after a successful create), unless --keep

Options:
  --name NAME              TPU VM name (lower-case letters, digits, -)
  --zone ZONE              e.g. us-west4-a
  --project PROJECT        GCP project (default: gcloud's configured project)
  --accelerator-type TYPE  create/all: e.g. v5litepod-256
  --version RUNTIME        create/all: TPU software version, e.g. v2-alpha-tpuv5-lite
  --spot | --preemptible   create/all: a Spot or preemptible slice
  --reuse                  create/all: keep an existing slice of that name
  --bucket gs://B[/P]      run/all: bucket path for data and runs
  --data-dir PATH          run/all: passed as --config.data.dir (default: BUCKET/data); a
                           gs:// path or the same absolute path on every worker
  --workdir gs://...       run/all: passed as --workdir (default: BUCKET/runs/NAME)
  --module NAME            run/all: Python module (default: whmae.pretrain)
  --config SPEC            run/all: passed as --config SPEC, e.g. configs/pretrain.py:base
  --ref GIT_REF            setup/all: what to ship (default: HEAD; uncommitted changes are
                           not shipped)
  --jax-spec SPEC          setup/all: pip requirement for JAX on TPU
                           (default: jax[tpu]==<the version pinned in pyproject.toml>)
  --python-version V       setup/all: Python for the workers' venv (default: 3.11)
  --keep                   all: do not delete the slice at the end or on failure
  --dry-run                print every command (gcloud, git archive) exactly; run nothing
  -h, --help               show this help

Everything after `--` is passed to the program unchanged (run/all).

Example (v5e-256 = 64 workers x 4 chips, Spot, delete at the end):
  launch/tpu_pod.sh all --name whmae-v5e256 --zone us-west4-a --project my-proj \
    --accelerator-type v5litepod-256 --version v2-alpha-tpuv5-lite --spot \
    --bucket gs://my-bucket/whmae --config configs/pretrain.py:base \
    -- --distributed=on --config.train.steps=100000
EOF
}

subcommand=""
name=""
zone=""
project=""
accelerator_type=""
runtime_version=""
capacity=""
reuse=0
bucket=""
data_dir=""
workdir=""
module=whmae.pretrain
config=""
ref=HEAD
jax_spec=""
python_version=3.11
keep=0
dry_run=0
extra=()

while (($#)); do
  if [[ $1 == --?*=* ]]; then # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    create | setup | run | delete | all)
      [[ -z $subcommand ]] || die "two subcommands given: '$subcommand' and '$1'"
      subcommand=$1; shift ;;
    --name) need_value "$1" $# "${2-}"; name=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; zone=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; project=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $# "${2-}"; accelerator_type=$2; shift 2 ;;
    --version) need_value "$1" $# "${2-}"; runtime_version=$2; shift 2 ;;
    --spot | --preemptible)
      [[ -z $capacity || $capacity == "$1" ]] || die "--spot and --preemptible exclude each other"
      capacity=$1; shift ;;
    --reuse) reuse=1; shift ;;
    --bucket) need_value "$1" $# "${2-}"; bucket=$2; shift 2 ;;
    --data-dir) need_value "$1" $# "${2-}"; data_dir=$2; shift 2 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --module) need_value "$1" $# "${2-}"; module=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --ref) need_value "$1" $# "${2-}"; ref=$2; shift 2 ;;
    --jax-spec) need_value "$1" $# "${2-}"; jax_spec=$2; shift 2 ;;
    --python-version) need_value "$1" $# "${2-}"; python_version=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (program arguments go after --; see --help)" ;;
  esac
done

[[ -n $subcommand ]] || die "a subcommand is required: create, setup, run, delete or all"
[[ -n $name ]] || die "--name is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$name' must be lower-case letters, digits and -, starting with a letter"
[[ -n $zone ]] || die "--zone is required (e.g. us-west4-a)"
wants() { [[ $subcommand == all || " $* " == *" $subcommand "* ]]; }
if wants create; then
  [[ -n $accelerator_type ]] || die "$subcommand needs --accelerator-type (e.g. v5litepod-256)"
  [[ -n $runtime_version ]] || die "$subcommand needs --version (e.g. v2-alpha-tpuv5-lite)"
fi
if wants run; then
  [[ -n $bucket ]] || die "$subcommand needs --bucket gs://BUCKET[/PREFIX] for data and runs"
  [[ -n $module ]] || die "--module must not be empty"
  bucket=${bucket%/}
  data_dir=${data_dir:-$bucket/data}
  workdir=${workdir:-$bucket/runs/$name}
  for option in bucket workdir; do
    [[ ${!option} == gs://?* ]] ||
      die "--$option '${!option}' must be a gs:// path (every worker reads and writes it)"
  done
  # Data may also sit at the same absolute path on every worker (a gcsfuse mount, a disk).
  [[ $data_dir == gs://?* || $data_dir == /?* ]] ||
    die "--data-dir '$data_dir' must be a gs:// path or an absolute path on the workers"
elif ((${#extra[@]})); then
  die "program arguments after -- only apply to run and all, not $subcommand"
fi

repo=$(repo_root)
if [[ -z $jax_spec ]]; then
  pinned=$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' "$repo/pyproject.toml")
  jax_spec="jax[tpu]${pinned:+==$pinned}"
fi
location=("--zone=$zone")
[[ -z $project ]] || location+=("--project=$project")

# Print the command (stdout in --dry-run, stderr with "+ " otherwise) and run it unless dry.
run_cmd() {
  if ((dry_run)); then
    quote_cmd "$@"
    echo
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

tpu_vm() { # gcloud compute tpus tpu-vm VERB NAME ARGS... plus --zone/--project
  run_cmd gcloud compute tpus tpu-vm "$@" "${location[@]}"
}

do_create() {
  local create=(create "$name" "--accelerator-type=$accelerator_type" "--version=$runtime_version")
  [[ -z $capacity ]] || create+=("$capacity")
  if ((reuse)); then
    if ((dry_run)); then
      tpu_vm describe "$name"
      echo "# --reuse: the create below runs only if the describe above fails"
    elif gcloud compute tpus tpu-vm describe "$name" "${location[@]}" >/dev/null 2>&1; then
      echo "tpu_pod.sh: $name exists in $zone; reusing it (--reuse)" >&2
      return 0
    fi
  fi
  tpu_vm "${create[@]}"
}

do_setup() {
  local tarball=${TMPDIR:-/tmp}/whmae-$name.tar.gz
  if ((!dry_run)) && [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "tpu_pod.sh: warning: uncommitted changes in $repo are not shipped (git archive $ref)" >&2
  fi
  run_cmd git -C "$repo" archive --format=tar.gz -o "$tarball" "$ref"
  tpu_vm scp "$tarball" "$name:whmae.tar.gz" --worker=all
  local venv='$HOME/whmae-venv'
  local steps=(
    'rm -rf $HOME/whmae && mkdir -p $HOME/whmae && tar -xzf $HOME/whmae.tar.gz -C $HOME/whmae'
    # The TPU images ship an older system Python; uv fetches the one pyproject.toml needs.
    'export PATH=$HOME/.local/bin:$PATH'
    '{ command -v uv >/dev/null || python3 -m pip install -q --user uv ||'\
' curl -LsSf https://astral.sh/uv/install.sh | sh; }'
    "rm -rf $venv && uv venv -q --seed --python $(quote_word "$python_version") $venv"
    "$venv/bin/pip install -q -U $(quote_word "$jax_spec")"
    "$venv/bin/pip install -q -e \$HOME/whmae"
    "$venv/bin/python -c 'import jax, whmae; print(\"worker ready: jax\", jax.__version__)'"
  )
  local remote="" step
  for step in "${steps[@]}"; do remote+="${remote:+ && }$step"; done
  tpu_vm ssh "$name" --worker=all "--command=$remote"
}

do_run() {
  local program=(python -m "$module")
  [[ -z $config ]] || program+=(--config "$config")
  program+=(--workdir "$workdir" "--config.data.dir=$data_dir" ${extra[@]+"${extra[@]}"})
  local metadata='http://metadata.google.internal/computeMetadata/v1/instance/attributes'
  local copy_to
  copy_to="$(quote_word "$workdir")/logs/worker\$worker-\$(date +%Y%m%d-%H%M%S).log"
  local steps=(
    'cd $HOME/whmae' 'source $HOME/whmae-venv/bin/activate' 'mkdir -p $HOME/whmae-logs'
    "worker=\$(curl -sf -H 'Metadata-Flavor: Google' $metadata/agent-worker-number || hostname)"
    'log=$HOME/whmae-logs/worker$worker.log'
  )
  # Keep the program's status through tee, and save the log to the bucket either way.
  local pipeline
  pipeline="{ PYTHONUNBUFFERED=1 $(quote_cmd "${program[@]}") 2>&1 | tee \$log;"
  pipeline+=' status=${PIPESTATUS[0]};'
  pipeline+=" gcloud storage cp \$log $copy_to || echo \"worker \$worker: could not copy \$log\"; }"
  steps+=("$pipeline")
  local remote="" step
  for step in "${steps[@]}"; do remote+="${remote:+ && }$step"; done
  remote="status=1; $remote; exit \$status"
  tpu_vm ssh "$name" --worker=all "--command=$remote"
}

do_delete() {
  tpu_vm delete "$name" --quiet
}

case $subcommand in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    if ((dry_run && !keep)); then
      echo "# all: from here on, a failure or interrupt runs the delete command at once"
    fi
    if ((!keep && !dry_run)); then
      # Tear down on any failure or interrupt from here on: an idle slice costs money.
      trap 'status=$?; trap - EXIT; echo "tpu_pod.sh: failed or interrupted; deleting $name" >&2;
        do_delete || echo "tpu_pod.sh: could not delete $name; delete it by hand" >&2;
        exit "$status"' EXIT
      trap 'exit 130' INT TERM
    fi
    do_setup
    do_run
    trap - EXIT
    if ((keep)); then
      echo "tpu_pod.sh: --keep: $name stays up; delete it with: launch/tpu_pod.sh delete" \
        "--name $name --zone $zone${project:+ --project $project}" >&2
    else
      do_delete
    fi
    ;;
esac
