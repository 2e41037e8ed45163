"""Subprocess worker of tests/test_multiprocess.py: one process of a multi-process `gn train`.

    python tests/multiprocess_worker.py ARGV...        = `gn ARGV...`

With GN_TEST_KILL_AT_STEP=k and GN_TEST_KILL_PROCESS=i, process i kills itself with
SIGKILL right after step k's hooks ran (its checkpoint, if due, written): a crash, not
a clean stop. The hook is added here, in the test's worker, not in the toolkit.
"""

from __future__ import annotations

import os
import signal
import sys

from gn import cli
from gn.train import hooks as gn_hooks
from gn.train import trainer

KILL_AT = int(os.environ.get("GN_TEST_KILL_AT_STEP", "0"))
KILL_PROCESS = int(os.environ.get("GN_TEST_KILL_PROCESS", "1"))


def _with_kill(sess, save):
    hooks = gn_hooks.default_hooks(sess, save)
    if KILL_AT:
        import jax

        def kill(info):
            if info.step == KILL_AT and jax.process_index() == KILL_PROCESS:
                print(f"killing process {KILL_PROCESS} after step {KILL_AT}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.add_hook(kill, name="test_kill")
    return hooks


trainer.default_hooks = _with_kill      # setup() looks it up in the trainer's namespace

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
