"""Tiny entry point for launch tests: join the JAX job the environment describes, report it.

Run as `python -m distributed_probe [--workdir DIR]` (with tests/ on PYTHONPATH); prints one
JSON line with this process's index, the process count and the local/global device counts.
"""

import argparse
import json
import os

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank fails at once")
    args = parser.parse_args()
    if args.fail_rank is not None and args.fail_rank == int(os.environ.get("JAX_PROCESS_ID", 0)):
        raise SystemExit(f"probe: rank {args.fail_rank} fails on purpose")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    # A cross-process sum proves the processes really form one job.
    total = jax.jit(lambda x: x.sum())(
        jax.make_array_from_process_local_data(
            jax.sharding.NamedSharding(
                jax.make_mesh((jax.device_count(),), ("d",)), jax.sharding.PartitionSpec("d")
            ),
            jax.numpy.ones(jax.local_device_count()) * (jax.process_index() + 1),
        )
    )
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "global_sum": float(total),
        "tag": args.tag,
        "workdir": args.workdir,
    }
    print("PROBE " + json.dumps(report), flush=True)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
