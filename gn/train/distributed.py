"""One run over several processes (`jax.distributed`): who writes, and decisions all share.

`gn --distributed train ...` starts JAX's multi-process runtime before anything
else touches a device: from explicit `--coordinator HOST:PORT --num-processes N
--process-id I`, or from the environment JAX detects itself (SLURM's
`SLURM_*` variables under `srun`, `JAX_COORDINATOR_ADDRESS`, Open MPI, ...).
The mesh then spans every process's devices (`jax.devices()` is global), and
each process places its own shards of every batch: all processes read the same
global batch from the same seed and `make_array_from_callback` copies only the
addressable part to their devices (gn.train.mesh.put_batches).

Who does what, so that N processes make one run and not N:

* Files that describe the run (`config.yaml`, `metrics.jsonl`, `summary.json`,
  `loss.png`, TensorBoard/W&B loggers) are written by process 0 only; the others
  keep the same records in memory.
* Checkpoints are collective: every process saves and restores its shards
  (gn.train.checkpoint; process 0 commits between barriers).
* Decisions that only one process can make safely are made by process 0 and
  broadcast (`primary_decides`): the workdir lock, the config-drift check and the
  finished-run check. A refusal raises the same error in every process, and the
  CLI prints it once (from process 0).
* A stop request (SIGTERM before preemption, Ctrl-C) that reaches any process
  stops all of them at the same step boundary (`max_over_processes`), so no process is
  left waiting in a collective the others never enter (gn.train.interrupts.agreed).

With one process every helper here is the plain single-process behaviour; no
collective is issued.

The workdir must be on a filesystem every process sees (as SLURM clusters
provide); process 0 holds the lock file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import numpy as np

from gn.errors import ConfigError, RunError

T = TypeVar("T")
_ERRORS = {"ConfigError": ConfigError, "RunError": RunError}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start `jax.distributed`: explicit arguments where given, JAX's detection for the rest.

    Must run before any JAX computation. On CPU the cross-process collectives are
    gloo's (set explicitly: it is the default of jax 0.10 but not guaranteed later)."""
    import jax

    if (num_processes is None) != (process_id is None):
        raise ConfigError("--num-processes and --process-id are given together (or neither, to let JAX "
                          "read them from the cluster's environment, e.g. SLURM's under srun).")
    if num_processes is not None and not (0 <= process_id < num_processes):
        raise ConfigError(f"--process-id must be in 0 .. {num_processes - 1} for --num-processes "
                          f"{num_processes}, got {process_id}.")
    if num_processes is not None and coordinator is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise ConfigError("--num-processes needs --coordinator HOST:PORT (the address of process 0), "
                          "or JAX_COORDINATOR_ADDRESS in the environment.")
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, KeyError, ValueError):   # an option a later jax may drop (gloo its default)
            pass
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--distributed: jax.distributed.initialize failed ({exc}). Give --coordinator, "
                          f"--num-processes and --process-id, or launch under a cluster manager JAX "
                          f"detects (srun).") from None


def process() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    import jax

    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one process; several: tests/test_multiprocess.py)."""
    if process()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """True in process 0 (and in a single-process run): the one that writes the run's files."""
    return process()[0] == 0


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable `value`, in every process (the others' `value` is ignored)."""
    index, count = process()
    if count == 1:
        return value
    from jax.experimental import multihost_utils

    data = json.dumps(value).encode("utf-8") if index == 0 else b""
    # Two broadcasts: the length, then the bytes padded to it (every process must pass the same shape).
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buf = np.zeros(n, np.uint8)
    if index == 0:
        buf[:] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(bytes(out.astype(np.uint8)).decode("utf-8"))


def max_over_processes(value: int) -> int:
    """The largest of every process's integer `value`, in every process (a no-op with one process)."""
    if process()[1] == 1:
        return int(value)
    from jax.experimental import multihost_utils

    values = multihost_utils.process_allgather(np.asarray([int(value)], np.int32))
    return int(np.asarray(values).max())


def primary_decides(decide: Callable[[], T]) -> T:
    """Run `decide()` in process 0 only and give its outcome to every process.

    A ConfigError or RunError raised by process 0 is raised in every process with
    the same message; in the others it carries `echo = True`, so the CLI prints it
    once. Any other exception in process 0 is broadcast as a RunError. The result must be
    JSON-serialisable (the others receive it through JSON)."""
    index, count = process()
    if count == 1:
        return decide()
    outcome, error = None, None
    if index == 0:
        try:
            result = decide()
            outcome = {"ok": result}
        except (ConfigError, RunError) as exc:
            error, outcome = exc, {"error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the others must not wait forever
            error, outcome = exc, {"error": "RunError",
                                   "message": f"process 0 failed: {type(exc).__name__}: {exc}"}
    shared = broadcast_json(outcome)
    if index == 0:
        if error is not None:
            raise error
        return result
    if "error" in shared:
        exc = _ERRORS[shared["error"]](shared["message"])
        exc.echo = True
        raise exc
    return shared["ok"]


__all__ = ["initialize", "process", "barrier", "is_primary", "broadcast_json", "max_over_processes", "primary_decides"]
