"""The workdir lock: one `gn train` process at a time on a workdir.

`workdir/train.lock` (JSON: pid, host, start time, command, and the SLURM job and
restart count under SLURM) is created with O_CREAT|O_EXCL and removed when the
run ends, also on exceptions (gn.train.workdirs.claim holds it). A second
`gn train` on the workdir is refused naming the holder's pid and host. A lock
whose pid is not alive on this host (a killed run) is reported as stale and
taken over; a lock from another host is never taken over (delete the file by
hand if that run is gone), except one left by an earlier incarnation of the
same SLURM job: a requeued job may restart on another node, and SLURM runs a
job once at a time (SLURM_JOB_ID equal, SLURM_RESTART_COUNT higher). In a
multi-process run process 0 alone holds it (gn.train.distributed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid
from pathlib import Path

from gn.errors import ConfigError, os_error

LOCK = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job() -> dict:
    """The SLURM job (array task) this process runs in and its restart count, or {} outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restart = 0
    return {"slurm_job": job, "slurm_restart": restart}


def _requeued(info: dict) -> bool:
    """A lock left by an earlier incarnation of this same SLURM job: after a requeue (preemption)
    SLURM runs a job once at a time, so that holder is gone, even if it ran on another host."""
    mine = _slurm_job()
    theirs = info.get("slurm_restart")
    return (bool(mine) and info.get("slurm_job") == mine["slurm_job"] and isinstance(theirs, int)
            and theirs < mine["slurm_restart"])


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')})"


class Lock:
    """The workdir's lock file, held by this process until `release()`."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), **_slurm_job()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                raise os_error(exc, f"creating the lock file {self.path}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.info))
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise os_error(exc, f"writing the lock file {self.path}") from None
            return
        raise ConfigError(f"Could not take the lock {self.path}: other processes keep taking it.")

    def _take_over_if_stale(self) -> None:
        info = _read_lock(self.path)
        if info is None:
            try:   # being written by a process that just created it: held, unless old
                age = datetime.datetime.now().timestamp() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < 30:
                raise ConfigError(f"The workdir {self.path.parent} is being claimed by another `gn train` "
                                  f"(lock file {self.path} was just created).")
            reason = "unreadable, more than 30 s old"
        elif _requeued(info):
            reason = (f"{_describe(info)} was incarnation {info.get('slurm_restart', 0)} of SLURM job "
                      f"{info['slurm_job']}, which SLURM has requeued (this is incarnation {_slurm_job()['slurm_restart']})")
        elif info.get("host") != socket.gethostname():
            raise ConfigError(
                f"The workdir {self.path.parent} is in use by {_describe(info)} (lock file {self.path}). "
                f"It was taken on another host, so whether that run is alive cannot be checked here; if it is "
                f"gone, delete the lock file and rerun.")
        elif _alive(info["pid"]) and info["pid"] != os.getpid():
            raise ConfigError(
                f"The workdir {self.path.parent} is in use by {_describe(info)}: another `gn train` is running "
                f"on it (lock file {self.path}). Wait for it to end or stop it (kill -TERM {info['pid']} "
                f"checkpoints and stops it), or use another --workdir.")
        else:
            reason = f"{_describe(info)} is not running"
        # Move the stale file aside, then check that it is the one we judged stale.
        aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise os_error(exc, f"replacing the stale lock file {self.path}") from None
        if _read_lock(aside) != info:     # someone else replaced it meanwhile: put theirs back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        print(f"warning: took over a stale lock on {self.path.parent} ({reason})", file=sys.stderr, flush=True)

    def release(self) -> None:
        if _read_lock(self.path) == self.info:
            with contextlib.suppress(OSError):
                self.path.unlink()


__all__ = ["LOCK", "Lock"]
