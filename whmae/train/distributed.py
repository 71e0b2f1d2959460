"""Multi-host start-up: one call, `maybe_initialize()`, before JAX touches a device.

Which processes form one job is read from the environment, in this order:

1. Explicit (any cluster, multi-GPU boxes, tests). The launch scripts set
     JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator, e.g. "10.0.0.1:1234"
     JAX_NUM_PROCESSES        total number of processes in the job
     JAX_PROCESS_ID           this process's rank, 0 .. JAX_NUM_PROCESSES - 1
     JAX_LOCAL_DEVICE_IDS     optional, comma-separated local accelerator ids this
                              process owns (e.g. "0" for one process per GPU)
   and we call `jax.distributed.initialize` with exactly these values.
2. SLURM with SLURM_NTASKS > 1 (srun, one task per GPU or per node): JAX's own
   SLURM detection picks coordinator, rank and count.
3. A multi-worker Cloud TPU VM slice (TPU_WORKER_HOSTNAMES lists more than one
   host): JAX's Cloud TPU detection.
4. Otherwise one process with all local devices; nothing is initialised.

`mode="on"` forces auto-detection (case 2/3 logic inside JAX) and `mode="off"`
skips it. Calling again after a successful initialisation does nothing.
"""

from __future__ import annotations

import logging
import os

import jax

MODES = ("auto", "on", "off")


def _local_device_ids() -> list[int] | None:
    raw = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if not raw:
        return None
    try:
        return [int(i) for i in raw.split(",") if i.strip()]
    except ValueError:
        raise ValueError(
            f"JAX_LOCAL_DEVICE_IDS={raw!r} must be comma-separated integers, e.g. '0,1'"
        ) from None


def _required_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be set too")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be an integer") from None


def detected_launcher() -> str | None:
    """The multi-process launcher the environment describes, or None for one process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or _on_gce_tpu_vm():
        return "cloud_tpu"
    return None


def _on_gce_tpu_vm() -> bool:
    """A Cloud TPU VM (created with gcloud, not GKE): JAX's own detector, which asks the
    metadata server only when the machine has TPU chips."""
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster

    return GceTpuCluster.is_env_present()


def maybe_initialize(mode: str = "auto") -> bool:
    """Join the multi-process job the environment describes; True if distributed.

    Must run before the first JAX computation. Idempotent.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}; expected one of {MODES}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    launcher = detected_launcher()
    if launcher == "explicit":
        num_processes = _required_int("JAX_NUM_PROCESSES")
        process_id = _required_int("JAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id} outside 0..{num_processes - 1}")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=_local_device_ids(),
        )
    elif launcher is not None or mode == "on":
        jax.distributed.initialize()
    else:
        return False
    logging.info(
        "distributed (%s): process %d of %d, %d local / %d global devices",
        launcher or "auto",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
