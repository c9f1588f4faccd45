"""Coordination engines behind one protocol (`Coordinator`): pick one, or let `resolve` find it.

Engines, each in its own module: the in-process group (`local`), ``shardckpt
launch`` (`launcher`), torch.distributed (`torch_distributed`), JAX's distributed
runtime (`jax_distributed`), TensorFlow's coordination service (`tf_coordination`)
and MPI (`mpi`).  A framework is never imported here: detection only looks at
what the program has already imported and initialised.
"""

from __future__ import annotations

import os
import sys

from ..errors import EngineNotInitializedError
from .base import Coordinator, KeyValueCoordinator, SingleClient, default_timeout
from .launcher import ENV_ADDRESS, KVServer, LauncherCoordinator
from .local import LocalCoordinator, LocalGroup

__all__ = [
    "Coordinator",
    "KVServer",
    "KeyValueCoordinator",
    "LauncherCoordinator",
    "LocalCoordinator",
    "LocalGroup",
    "SingleClient",
    "default_timeout",
    "resolve",
]

_cached: Coordinator | None = None


def _detect() -> Coordinator:
    if os.environ.get(ENV_ADDRESS):
        return LauncherCoordinator.from_env()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from .torch_distributed import TorchCoordinator

        return TorchCoordinator()
    jax_dist = sys.modules.get("jax._src.distributed")
    if jax_dist is not None and getattr(jax_dist.global_state, "client", None) is not None:
        from .jax_distributed import JaxCoordinator

        return JaxCoordinator()
    if "tensorflow" in sys.modules and os.environ.get("DTENSOR_JOBS"):
        from .tf_coordination import TFCoordinator

        return TFCoordinator()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.COMM_WORLD.Get_size() > 1:
        from .mpi import MPICoordinator

        return MPICoordinator()
    _refuse_split_job()
    return SingleClient()


# Variables that launchers set when they start many processes of one job, and what to initialise then.
_JOB_VARIABLES = (
    ("WORLD_SIZE", "torch.distributed (torchrun)", "call torch.distributed.init_process_group() first"),
    ("OMPI_COMM_WORLD_SIZE", "MPI (Open MPI)", "import mpi4py.MPI first (it initialises MPI)"),
    ("PMI_SIZE", "MPI (MPICH/Hydra)", "import mpi4py.MPI first (it initialises MPI)"),
    ("PMIX_SIZE", "MPI (PMIx)", "import mpi4py.MPI first (it initialises MPI)"),
    ("JAX_NUM_PROCESSES", "JAX", "call jax.distributed.initialize() first"),
    ("DTENSOR_NUM_CLIENTS", "TensorFlow DTensor", "import tensorflow and call dtensor.initialize_accelerator_system()"),
)


def _refuse_split_job() -> None:
    """Several processes that each became "the only client" would each write a whole checkpoint to one prefix."""
    for var, what, fix in _JOB_VARIABLES:
        value = os.environ.get(var, "")
        if value.strip().isdigit() and int(value) > 1:
            raise EngineNotInitializedError(
                f"this process is one of {int(value)} ({var}={value}, set by {what}) but no engine is initialised "
                f"to reach the others: {fix}, or pass coordinator= explicitly "
                "(shardckpt.coordination.SingleClient() if each process really saves on its own)"
            )


def resolve(coordinator: Coordinator | None) -> Coordinator:
    """``coordinator`` itself, or the engine this process has initialised (made once, then reused)."""
    global _cached
    if coordinator is not None:
        return coordinator
    if _cached is None:
        _cached = _detect()
    return _cached
