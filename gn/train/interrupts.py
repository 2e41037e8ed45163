"""SIGTERM and Ctrl-C stop training at a step boundary, with a checkpoint.

SLURM sends SIGTERM before it preempts or times out a job. While `handled()`
is active (the trainer wraps each run in it), SIGTERM and SIGINT only set a
flag; the training loop checks `pending()` before each step, and the trainer
then saves a checkpoint of the step just finished and raises
`gn.errors.Stopped` ("stopped by SIGTERM at step N; rerun the same command to
resume"). The CLI exits with 128 + the signal number: 143 for SIGTERM, 130 for
Ctrl-C. A second Ctrl-C stops at once (KeyboardInterrupt; the run resumes from
its last regular checkpoint).

Handlers are installed only in the main thread and restored afterwards. A
signal that arrives after the last step is left pending (the finished run is
not thrown away): the next run in the same process stops before its first step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

from gn.errors import Stopped

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []


def pending() -> int | None:
    """The signal number of a stop request not yet acted on, or None."""
    return _pending[0] if _pending else None


def agreed() -> int | None:
    """`pending()` agreed by every process of a multi-process run: a request that reached any
    process is taken by all (the largest signal number), so all stop at the same step boundary
    and take part in the same checkpoint. One collective per call; with one process, `pending()`."""
    from gn.train import distributed

    if distributed.process()[1] == 1:
        return pending()
    signum = distributed.max_over_processes(pending() or 0)
    if signum and not _pending:
        _pending.append(signum)
    return pending()


def _handler(signum, frame) -> None:
    if _pending and signum == signal.SIGINT:
        raise KeyboardInterrupt          # second Ctrl-C: stop now
    if not _pending:
        _pending.append(signum)
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step "
              "(checkpointing first)" + ("; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Route SIGTERM/SIGINT to the stop flag for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def stop_if_requested(sess, save: Callable[[object], None]) -> None:
    """After the loop: if it stopped for a signal before the run's end, save a
    checkpoint of the current step (unless one exists) and raise Stopped."""
    signum = pending()
    if signum is None or sess.diverged or sess.stop_reason != "steps" or sess.counters["step"] >= sess.run.steps:
        return
    step = sess.counters["step"]
    if step not in sess.ckpt.steps():
        save(sess)
    _pending.clear()
    name = signal.Signals(signum).name if signum != signal.SIGINT else "Ctrl-C"
    raise Stopped(signum, step, f"stopped by {name} at step {step} (checkpoint saved in {sess.ckpt.directory}); "
                                f"rerun the same command to resume")
