"""User-facing errors.

`ConfigError` is raised for bad input (config keys, values, missing data files,
unknown methods). The CLI prints its message as one paragraph, without a
traceback, and exits with status 2. Raise it before any compute starts.
"""

from __future__ import annotations

import difflib
import errno
from typing import Iterable


class ConfigError(ValueError):
    """Bad user input, detected before any compute. The message is shown as is."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid name, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond holds."""
    if not cond:
        raise ConfigError(message)


class RunError(Exception):
    """The run cannot go on for a reason outside the config: the operating system
    refused a read or write (read-only or full disk, a path that is a file,
    unreadable data). Raised at the precise place (checkpoint save, metrics
    append, config dump, data read) with what was being done; the CLI prints it
    as one paragraph and exits with status 2. Files written before stay intact."""


def os_error(exc: BaseException, doing: str) -> RunError:
    """A RunError for `exc` (an OSError or a decompression error) raised while `doing` ("writing X")."""
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    hint = ""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        hint = " The disk is full: free space (or move the run) and rerun the same command to resume."
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " The location is not writable: fix its permissions or choose another directory."
    elif code in (errno.EEXIST, errno.ENOTDIR):
        hint = " A file stands where a directory is needed: choose another path."
    return RunError(f"Error {doing}: {detail}.{hint}")


class Stopped(KeyboardInterrupt):
    """Training stopped at a step boundary after SIGTERM or Ctrl-C, with a checkpoint
    of that step; the CLI prints the message and exits with 128 + signum."""

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(message)
        self.signum, self.step, self.message = signum, step, message
