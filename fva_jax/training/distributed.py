"""Several hosts: jax.distributed set-up and the few collectives the trainer needs.

* `initialize_distributed(config.distributed)`: jax.distributed.initialize() on TPU pods,
  SLURM / Open MPI jobs or with an explicit coordinator (also CPU processes on one machine,
  with gloo collectives, for tests);
* `to_host`: NumPy copy of a replicated (possibly multi-host) tree of arrays;
* `local_rows`: this host's rows of a batch-sharded array.
"""

import os

import jax
import ml_collections
import numpy as np


def multi_host_environment() -> bool:
    """True in environments that launch one process per host (pods, SLURM, Open MPI)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def initialize_distributed(dist_config: ml_collections.ConfigDict) -> bool:
    """Calls jax.distributed.initialize() when config.distributed asks for it (see config_lib).

    Must run before any JAX computation. Returns True if this call initialised it.
    """
    if jax.distributed.is_initialized() or dist_config.initialize == "never":
        return False
    if (
        dist_config.initialize == "auto"
        and not dist_config.coordinator_address
        and not multi_host_environment()
    ):
        return False
    if dist_config.cpu_collectives != "none":
        # Only affects the CPU backend; needed for multi-process CPU runs (docs/DESIGN.md §4).
        jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs["coordinator_address"] = dist_config.coordinator_address
    if dist_config.num_processes >= 1:
        kwargs["num_processes"] = dist_config.num_processes
    if dist_config.process_id >= 0:
        kwargs["process_id"] = dist_config.process_id
    # A process whose heartbeats stop for this long is declared lost, and JAX's coordination
    # service then terminates the others: the bound on waiting for a lost host.
    kwargs["heartbeat_timeout_seconds"] = int(dist_config.heartbeat_timeout_s)
    jax.distributed.initialize(**kwargs)
    return True


def to_host(tree):
    """numpy copy of a replicated (possibly multi-host) tree of arrays."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded array, in the order of its local batch."""
    shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    rows, seen = [], set()
    for sh in shards:  # a replicated axis would repeat rows: keep each slice once
        key = (sh.index[0].start, sh.index[0].stop)
        if key not in seen:
            seen.add(key)
            rows.append(np.asarray(sh.data))
    return np.concatenate(rows)
