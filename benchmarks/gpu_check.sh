#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (H100/H200): benchmarks/gpu_check.py's
# sections in order, each guarded and time-budgeted: (a) the tiny config's first 20 losses
# on the GPU vs CPU (fp32, bf16), (b) the measured bf16 matmul peak, (c) the paper and base
# train steps in bf16 (attention xla vs cudnn, remat off/on, per-device batch swept until
# it fails: exams/s, MFU, compile time, memory), (d) the training loop over Grain reading
# ArrayRecord shards at 128x128x50 vs the step alone (>= 90 %, or where the time goes).
# JSON + markdown in the --out folder; the table is printed last.
#
#   bash benchmarks/gpu_check.sh --out DIR [gpu_check.py options]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --cpu --out DIR   # CPU rehearsal
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run         # the plan only
#
# If gpu_check.py dies (a crash in a CUDA library, not an exception: those are recorded),
# it is started again with --resume: what was done is kept, the point it died in is marked
# crashed, and it goes on after it, under the same overall deadline (GPU_CHECK_DEADLINE_S,
# default 470 s from this script's start; a watchdog reports and exits 45 s past it).
#
# Packages. Such a machine's image has jax (with CUDA; newer than our pin is fine), flax,
# optax and orbax, but not grain (nor its portpicker), array-record, ml-collections or
# tensorboardX. tensorflow-datasets, nibabel and pydicom are not imported on these paths.
# Fetch the wheels once, here in the repo root (Python 3.12, manylinux x86_64, the versions
# pinned in pyproject.toml / installed in .venv):
#   echo /.whl/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
#      --platform manylinux1_x86_64"
#   python3 -m pip download $P -d .whl grain==0.2.18 array-record==0.8.6 \
#       ml-collections==1.1.0 tensorboardX==2.6.5 portpicker==1.6.0
#   python3 -m pip download $P -d .whl/fallback flax==0.12.8 optax==0.2.8 \
#       orbax-checkpoint==0.12.8
# .whl/*.whl are installed (into /tmp/site) when those modules are missing; .whl/fallback
# (our pinned flax, optax, orbax) only when the machine's own cannot import whmae's train
# step and checkpointing, or with GPU_CHECK_FALLBACK=1. About 7 MiB in all.
#
# On the device machine, one call of the `run` tool, carry [".whl"], timeout_s 540:
#   set -o pipefail; bash benchmarks/gpu_check.sh --out $OUT 2>&1 | tee $OUT/log.txt
# ($OUT/gpu_check.json, $OUT/gpu_check.md and $OUT/log.txt come back.)
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-python3}

rehearsal=0
for arg in "$@"; do
  case $arg in --cpu | --dry-run) rehearsal=1 ;; esac
done

install() {  # wheel files...
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$@" || exit 1
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
}

export PYTHONPATH=$root:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}
# The carried wheels are for the GPU machine (Python 3.12); a rehearsal uses what it has.
if [ $rehearsal = 0 ] &&
  ! "$py" -c "import grain, array_record, ml_collections, tensorboardX, portpicker" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing the carried wheels: $(cd .whl && echo *.whl)"
    install .whl/*.whl
  else
    echo "gpu_check.sh: grain/array-record/ml-collections/tensorboardX missing and no .whl/" >&2
  fi
fi
check="import whmae.train.step, whmae.train.checkpoint, whmae.train.loop; from flax import nnx
nnx.use_eager_sharding"
if [ $rehearsal = 0 ] && { [ "${GPU_CHECK_FALLBACK:-0}" = 1 ] || ! "$py" -c "$check" 2>/dev/null; }; then
  if compgen -G ".whl/fallback/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing .whl/fallback (flax, optax, orbax as pinned)"
    install .whl/fallback/*.whl
  fi
  "$py" -c "$check" || echo "gpu_check.sh: whmae's train modules do not import" >&2
fi

export PYTHONUNBUFFERED=1
export TQDM_DISABLE=${TQDM_DISABLE:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
deadline=()
if [ $rehearsal = 0 ]; then
  deadline=(--deadline-at $((start + ${GPU_CHECK_DEADLINE_S:-470})))
fi
status=0
for attempt in 1 2 3 4; do
  resume=()
  if [ "$attempt" -gt 1 ]; then resume=(--resume); fi
  "$py" benchmarks/gpu_check.py ${deadline[@]+"${deadline[@]}"} "$@" ${resume[@]+"${resume[@]}"}
  status=$?
  case $status in
    0 | 1 | 2 | 3) break ;; # done, error, usage or no GPU, watchdog
  esac
  echo "gpu_check.sh: gpu_check.py died (exit $status): resuming after the point it died in" >&2
done
exit $status
