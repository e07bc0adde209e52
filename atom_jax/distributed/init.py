"""Joining a multi-host run: flags, environment, SLURM, `jax.distributed.initialize`.

Where the coordinator address, process count and process id come from, first found wins:
  1. flags `--coordinator-address HOST:PORT`, `--num-processes N`, `--process-id I`;
  2. `ATOM_JAX_COORDINATOR`, `ATOM_JAX_NUM_PROCESSES`, `ATOM_JAX_PROCESS_ID`
     (and JAX's own `JAX_COORDINATOR_ADDRESS`, which jax reads itself);
  3. a cluster jax detects by itself when values are left unset: SLURM (inside `srun`, from
     SLURM_NTASKS / SLURM_PROCID / the step's first node), Open MPI, mpi4py.
A run is multi-host when the process count is > 1 or SLURM launched more than one task;
otherwise nothing is initialised and the engine runs in this one process.

Nothing here imports jax: the CLIs read flags before jax is imported. Joining the run is
`join.initialize`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger("atom_jax.distributed")

ENV_COORDINATOR = "ATOM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ATOM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ATOM_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ATOM_JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass
class DistributedConfig:
    coordinator_address: str | None = None  # None: jax detects it (SLURM, MPI)
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: jax's default
    # The coordination service declares a process dead after this long without heartbeats
    # and then terminates every other process (the backstop behind step_timeout).
    heartbeat_timeout: int = 100
    init_timeout: int = 300  # seconds to wait for every process to join
    # A step (plan broadcast + model step) that takes longer means a dead or hung peer.
    step_timeout: float = 60.0
    # Added to step_timeout for a step shape not run before (it compiles first).
    compile_timeout: float = 1800.0
    keepalive: float = 1.0  # an idle scheduler process sends an empty plan this often


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "multi-host (one process per host; see README 'Multi-host')")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"process 0's address and a free port (default: ${ENV_COORDINATOR}, "
                        "$JAX_COORDINATOR_ADDRESS, or SLURM's first node)")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"processes in the run (default: ${ENV_NUM_PROCESSES} or SLURM_NTASKS; 1: single host)")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's id, 0 runs the front end (default: ${ENV_PROCESS_ID} or SLURM_PROCID)")
    g.add_argument("--local-device-ids", default=None, metavar="IDS",
                   help="comma list of this host's accelerators to use (default: "
                        f"${ENV_LOCAL_DEVICE_IDS}; jax's default is all, but one per task under SLURM)")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds without heartbeats before jax declares a process dead and stops all "
                        "(default: 100)")
    g.add_argument("--step-timeout", type=float, default=60.0,
                   help="seconds a multi-host step may take before the run is declared failed "
                        "(default: 60)")
    g.add_argument("--compile-timeout", type=float, default=1800.0,
                   help="extra seconds allowed for a step of a shape not compiled yet (default: 1800)")
    g.add_argument("--keepalive", type=float, default=1.0,
                   help="seconds between empty plans the idle process 0 sends, a liveness check "
                        "(default: 1.0)")


def _env_int(environ, name: str) -> int | None:
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {text!r}") from None


def _ids(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} takes a comma list of ints, got {text!r}") from None


def slurm_tasks(environ=os.environ) -> int:
    """Tasks of the SLURM job step this process runs in (0 outside `srun`)."""
    if "SLURM_JOB_ID" not in environ or "SLURM_STEP_ID" not in environ:
        return 0
    return _env_int(environ, "SLURM_STEP_NUM_TASKS") or _env_int(environ, "SLURM_NTASKS") or 0


def resolve(args, environ=os.environ) -> DistributedConfig | None:
    """The run's distributed settings, or None for a single-process run."""
    coordinator = (getattr(args, "coordinator_address", None) or environ.get(ENV_COORDINATOR)
                   or environ.get("JAX_COORDINATOR_ADDRESS"))
    num = getattr(args, "num_processes", None)
    num = num if num is not None else _env_int(environ, ENV_NUM_PROCESSES)
    pid = getattr(args, "process_id", None)
    pid = pid if pid is not None else _env_int(environ, ENV_PROCESS_ID)
    local = _ids(getattr(args, "local_device_ids", None) or environ.get(ENV_LOCAL_DEVICE_IDS),
                 "--local-device-ids")
    slurm = slurm_tasks(environ)
    if num is None and slurm <= 1 and coordinator is None and pid is None:
        return None
    if num is not None and num < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num}")
    if num == 1 or (num is None and slurm == 1):
        return None
    if slurm <= 1 and None in (coordinator, num, pid):
        missing = [n for n, v in (("--coordinator-address", coordinator), ("--num-processes", num),
                                  ("--process-id", pid)) if v is None]
        raise ValueError(f"a multi-host run needs {', '.join(missing)} (flags, ${ENV_COORDINATOR} / "
                         f"${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID}, or launch under SLURM's srun)")
    if num is not None and pid is not None and not 0 <= pid < num:
        raise ValueError(f"--process-id must be in [0, {num}), got {pid}")
    cfg = DistributedConfig(coordinator, num, pid, local)
    for name in ("heartbeat_timeout", "step_timeout", "compile_timeout", "keepalive"):
        value = getattr(args, name, None)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
            setattr(cfg, name, value)
    return cfg
