"""One run over several real processes (`gn --distributed train`), against one process.

Each test starts 2 or 4 OS processes of `gn train` (tests/multiprocess_worker.py, one
CPU device each, JAX's gloo collectives, the coordinator on 127.0.0.1) on one workdir,
and compares the metrics process 0 wrote with a single-process run of the same config
on one device, at the sharding tests' tolerance (tests/test_sharding.py: RTOL 2e-6; the
2-process adamw run measured bit-identical to one process with two devices). Also
checked: process 0 alone writes the run's files; a busy workdir is refused once; a run
whose process is killed with SIGKILL mid-run resumes, after all processes are restarted,
from its last checkpoint to the losses of an uninterrupted run.

The default suite keeps the 2-process adamw case and the lock refusal; the other methods,
4 processes and kill-and-resume are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gn.config import load_config
from gn.train.trainer import train
from tests.tiny_models import nano_run

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
RTOL = 2e-6                  # tests/test_sharding.py's tolerance for a sharded run against one device

METHODS = {
    "adamw": {"name": "adamw", "learning_rate": 0.01},
    "fog": {"name": "fog"},
    "gn": {"name": "gn", "inner_steps": 2},
    "gn_layerwise": {"name": "gn_layerwise", "inner_steps": 2, "inner_learning_rate": 0.02},
}


def _config(tmp: Path, method: str, steps: int = 4) -> Path:
    raw = nano_run([METHODS[method]], steps=steps, checkpoint_every=2, ema_decay=0.9)
    path = tmp / f"{method}_{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    env.pop("XLA_FLAGS", None)          # one CPU device per process
    return env


def _start(n: int, config: Path, method: str, workdir: Path, **env) -> list[subprocess.Popen]:
    port = _port()
    return [subprocess.Popen(
        [sys.executable, str(WORKER), "--distributed", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", str(n), "--process-id", str(i), "train", str(config), "--method", method,
         "--workdir", str(workdir)],
        cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    out = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _launch(n: int, config: Path, method: str, workdir: Path, **env) -> list[tuple[int, str, str]]:
    results = _wait(_start(n, config, method, workdir, **env))
    for i, (rc, o, e) in enumerate(results):
        assert rc == 0, f"process {i} of {n} exited {rc}:\n{o[-2000:]}\n{e[-4000:]}"
    return results


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> np.ndarray:
    rows = _rows(workdir)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return np.array([r[k] for r in rows for k in ("train_loss", "val_loss", "val_loss_ema") if k in r])


def _single(tmp: Path, config: Path, method: str) -> np.ndarray:
    workdir = tmp / f"single_{config.stem}"
    train(load_config(config), method, workdir)
    return _losses(workdir)


def _check_match(tmp: Path, n: int, method: str) -> None:
    config = _config(tmp, method)
    workdir = tmp / f"p{n}_{method}"
    results = _launch(n, config, method, workdir)
    got, ref = _losses(workdir), _single(tmp, config, method)
    assert got.shape == ref.shape and len(got) > 8
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0, err_msg=f"{method} on {n} processes")
    # The run's files come from process 0 only: one summary line, one record per step.
    assert f"{method}: 4 steps" in results[0][1]
    for rc, o, e in results[1:]:
        assert f"{method}: 4 steps" not in o, o
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] == pytest.approx(ref[-2], rel=RTOL)
    assert len(_rows(workdir)) == 5


def test_two_processes_train_adamw_like_one(tmp_path):
    _check_match(tmp_path, 2, "adamw")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fog", "gn", "gn_layerwise"])
def test_two_processes_train_like_one(tmp_path, method):
    _check_match(tmp_path, 2, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw", "fog", "gn", "gn_layerwise"])
def test_four_processes_train_like_one(tmp_path, method):
    _check_match(tmp_path, 4, method)


def test_busy_workdir_is_refused_once_in_every_process(tmp_path):
    """A live holder of the lock (this test process) refuses the run: exit 2 in both
    processes, the reason printed once (by process 0), nothing trained or written."""
    workdir = tmp_path / "busy"
    workdir.mkdir()
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "pytest"}
    (workdir / "train.lock").write_text(json.dumps(lock))
    results = _wait(_start(2, _config(tmp_path, "adamw"), "adamw", workdir))
    assert [rc for rc, _, _ in results] == [2, 2], results
    said = " ".join(results[0][2].split())         # the CLI wraps its message
    assert "is in use by" in said and f"pid {os.getpid()}" in said, said
    assert "error:" not in results[1][2], results[1][2]
    assert sorted(p.name for p in workdir.iterdir()) == ["train.lock"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw", "fog"])
def test_killed_process_resumes_to_the_uninterrupted_losses(tmp_path, method):
    """Process 1 is SIGKILLed after step 5 (checkpoints at 2 and 4); the survivor, stuck in a
    collective, is killed too; a restart of both resumes from step 4 and ends where an
    uninterrupted single-process run of 8 steps does."""
    config = _config(tmp_path, method, steps=8)
    workdir = tmp_path / f"killed_{method}"
    procs = _start(2, config, method, workdir, GN_TEST_KILL_AT_STEP="5", GN_TEST_KILL_PROCESS="1")
    try:
        procs[1].wait(timeout=600)
        assert procs[1].returncode == -signal.SIGKILL, procs[1].communicate()
        try:                             # process 0 cannot finish step 6 alone
            procs[0].wait(timeout=10)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert not (workdir / "summary.json").exists()
    assert max(r["step"] for r in _rows(workdir)) < 8
    results = _launch(2, config, method, workdir)
    assert "resumed from step 4" in results[0][1], results[0][1][-2000:]
    np.testing.assert_allclose(_losses(workdir), _single(tmp_path, config, method), rtol=RTOL, atol=0)
