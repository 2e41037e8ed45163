"""`gn sweep --emit slurm` run by a real SLURM (one node, scripts/slurm_local.sh), a requeued task included.

Slow (minutes): the daemons start, four tiny runs go through the job array, one running task is
requeued (`scontrol requeue`, what preemption does: SIGTERM, then the task runs again), and the
results are collected and analysed. Skipped, with the reason, when SLURM cannot be started here
(not root, packages not installed: `scripts/slurm_local.sh install`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"

SPEC = """
config:
  model: {preset: nano}
  data:
    source: synthetic
    seq_len: 32
    val_sequences: 16
    synthetic: {vocab_size: 64, order: 2, support: 4}
  train: {eval_every: 10, eval_batch_size: 16, checkpoint_every: 10, progress: false}
tokens: 81920
batch_sizes: [8, 16]
seeds: [0]
warmup_tokens: 1024
schedule: constant
targets: [4.0, 3.9]
lr: {base_batch: 8, points: 2, factor: 4}
methods:
  - name: adamw
    lr: {center: 1.0e-2}
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root here (scripts/slurm_local.sh runs the daemons as root)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("SLURM is not installed: run `scripts/slurm_local.sh install` (apt-get, as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "GN_SLURM_DIR": str(state), "GN_SLURM_PORT": "16917"}
    up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        pytest.skip(f"SLURM could not be started: {up.stderr.strip()[-500:]}")
    env["SLURM_CONF"] = up.stdout.strip().split("=", 1)[1]
    yield env
    subprocess.run(["bash", str(SCRIPT), "down"], env=env, timeout=60)


def _squeue(env, job: str) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=env, capture_output=True, text=True)
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]


def _gn(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "gn.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "wall" not in k and not k.endswith("_s")} for r in rows]


def _strip(x):
    if isinstance(x, dict):
        # wall times differ between any two runs; `source` names the directories analysed
        return {k: _strip(v) for k, v in x.items() if "wall" not in k and "time" not in k and k != "source"}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def test_slurm_array_requeue_collect_analyze(slurm, tmp_path):
    env = {**slurm, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    (tmp_path / "spec.yaml").write_text(SPEC)
    emit = _gn("sweep", "spec.yaml", "--workdir", "sl", "--emit", "slurm", cwd=tmp_path, env=env)
    assert emit.returncode == 0, emit.stderr
    # Submitted from another directory: the script's paths are absolute.
    sub = subprocess.run(["sbatch", "--parsable", str(tmp_path / "sl" / "sweep.sbatch")], cwd="/", env=env,
                         capture_output=True, text=True, check=True)
    job = sub.stdout.strip().split(";")[0]
    rows = [json.loads(line) for line in (tmp_path / "sl" / "manifest.jsonl").read_text().splitlines()]
    # Requeue task 0 once it runs and holds a checkpoint (SIGTERM: it checkpoints at a step boundary).
    ckpts = tmp_path / rows[0]["workdir"] / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:
        running = dict(_squeue(env, job))
        if running.get(f"{job}_0") == "RUNNING" and ckpts.is_dir() and any(
                p.name.startswith("step_") and "partial" not in p.name for p in ckpts.iterdir()):
            break
        assert not (tmp_path / rows[0]["workdir"] / "summary.json").exists(), "task 0 finished before the requeue"
        time.sleep(0.5)
    else:
        pytest.fail("task 0 never ran with a checkpoint")
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True, capture_output=True)
    while _squeue(env, job):
        assert time.time() < deadline + 600, "the array did not finish"
        time.sleep(2)
    log = (tmp_path / "sl" / "slurm" / f"{job}_0.out").read_text()
    assert "SIGTERM received" in log and "restart 1" in log
    assert "resumed from step" in log                             # continued from its checkpoint, not restarted
    resumed_at = int(log.split("resumed from step ")[1].split()[0])
    assert resumed_at > 0
    for r in rows:
        assert (tmp_path / r["workdir"] / "summary.json").is_file(), r["workdir"]
    # Collect (nothing to train) and analyse; the same spec through the local runner gives the same numbers.
    collect = _gn("sweep", "spec.yaml", "--workdir", "sl", cwd=tmp_path, env=env)
    assert collect.returncode == 0 and "0 trained; 4 finished" in collect.stdout + collect.stderr
    local = _gn("sweep", "spec.yaml", "--workdir", "loc", cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stderr
    for r in rows:
        a = _metrics(tmp_path / r["workdir"] / "metrics.jsonl")
        b = _metrics(tmp_path / "loc" / Path(r["workdir"]).name / "metrics.jsonl")
        assert a == b, r["workdir"]                              # the requeued run too: resume is exact
    for d in ("sl", "loc"):
        out = _gn("analyze", d, "--out", f"{d}_an", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
    sl, loc = (json.loads((tmp_path / f"{d}_an" / "analysis.json").read_text()) for d in ("sl", "loc"))
    assert _strip(sl) == _strip(loc)
