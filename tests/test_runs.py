"""Runs a researcher can trust: workdir lock, config drift, --branch, finished reruns,
OS errors as one paragraph (exit 2), config-file checks, SIGTERM/Ctrl-C, one-line warnings."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from gn import cli
from gn.config import config_from_dict, load_config
from gn.errors import ConfigError
from gn.train import trainer, workdirs

TINY = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seq_len": 64},
    "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 4,
             "synthetic": {"vocab_size": 16, "order": 1, "support": 3}},
    "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batch_size": 4, "checkpoint_every": 2,
              "progress": False},
    "methods": [{"name": "adamw", "learning_rate": 0.01}],
}
TIMING = {"step_time_s", "wall_time_s", "compile_time_s", "inner_time_s", "linesearch_time_s"}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _config(tmp_path, raw=TINY, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(capsys, *args):
    code = cli.main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def _train(capsys, cfg, workdir, *extra):
    return _cli(capsys, "train", cfg, "--method", "adamw", "--workdir", workdir, *extra)


def _no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(trainer, "setup", boom)


# ---------------------------------------------------------------------------- drift, finished, branch


def test_config_drift_refused_before_compute_naming_keys(tmp_path, capsys, monkeypatch):
    cfg, w = _config(tmp_path), tmp_path / "w"
    assert _train(capsys, cfg, w)[0] == 0
    before = (w / "metrics.jsonl").read_text()
    _no_compute(monkeypatch)
    code, _, err = _train(capsys, cfg, w, "--set", "methods.adamw.learning_rate=0.02", "--set", "train.seed=3")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "methods.adamw.learning_rate: 0.01 -> 0.02" in err and "train.seed: 0 -> 3" in err
    assert "--branch" in err
    # A changed model shape: the same clean refusal, no orbax error.
    code, _, err = _train(capsys, cfg, w, "--set", "model.hidden=64")
    assert code == 2 and "model.hidden: 32 -> 64" in err and "orbax" not in err.lower()
    assert (w / "metrics.jsonl").read_text() == before


def test_finished_rerun_does_nothing_and_steps_may_grow(tmp_path, capsys, monkeypatch):
    cfg, w = _config(tmp_path), tmp_path / "w"
    code, out, _ = _train(capsys, cfg, w)
    assert code == 0 and "resumed" not in out
    before = (w / "metrics.jsonl").read_text()
    real_setup = trainer.setup
    _no_compute(monkeypatch)
    code, out, _ = _train(capsys, cfg, w)
    assert code == 0 and "finished" in out and "adamw: 4 steps" in out
    assert (w / "metrics.jsonl").read_text() == before
    monkeypatch.setattr(trainer, "setup", real_setup)
    code, out, err = _train(capsys, cfg, w, "--set", "train.steps=6", "--set", "train.progress=true")
    assert code == 0 and "resumed from step 4" in out and "train.steps changed 4 -> 6" in err
    assert [r["step"] for r in _rows(w / "metrics.jsonl")] == list(range(7))


def test_branch_continues_from_the_latest_checkpoint(tmp_path, capsys):
    cfg, a, b = _config(tmp_path), tmp_path / "a", tmp_path / "b"
    assert _train(capsys, cfg, a)[0] == 0
    a_files = {p: p.read_bytes() for p in (a / "config.yaml", a / "metrics.jsonl", a / "summary.json")}
    new = ["--set", "methods.adamw.learning_rate=0.003", "--set", "train.steps=6"]
    code, out, err = _train(capsys, cfg, a, *new, "--branch", b)
    assert code == 0, err
    assert "branched" in err and "resumed from step 4" in out and f"-> {b}" in out
    info = json.loads((b / "branch.json").read_text())
    assert info["step"] == 4 and "methods.adamw.learning_rate" in info["changed"]
    rows_a, rows_b = _rows(a / "metrics.jsonl"), _rows(b / "metrics.jsonl")
    assert _strip(rows_b[:5]) == _strip(rows_a) and [r["step"] for r in rows_b] == list(range(7))
    branched = load_config(b / "config.yaml")
    assert branched.train.steps == 6 and branched.methods[0].to_dict()["learning_rate"] == 0.003
    assert 0 < rows_b[5]["lr"] <= 0.003
    assert all(p.read_bytes() == v for p, v in a_files.items())     # the source is untouched
    # Rerunning the branch command resumes the branch (here: finished).
    code, out, _ = _train(capsys, cfg, a, *new, "--branch", b)
    assert code == 0 and "finished" in out
    # A branch cannot change the model: refused before any restore.
    code, _, err = _train(capsys, cfg, a, "--set", "model.hidden=64", "--branch", tmp_path / "c")
    assert code == 2 and "model.hidden" in err and not (tmp_path / "c").exists()


def test_drift_diff_uses_dotted_paths():
    old = {"train": {"steps": 4, "seed": 0}, "methods": [{"name": "adamw", "learning_rate": 0.1}]}
    new = {"train": {"steps": 8, "seed": 0}, "methods": [{"name": "adamw", "learning_rate": 0.2, "b": 1}]}
    assert workdirs.config_diff(old, new) == {"methods.adamw.b": ("<absent>", 1),
                                              "methods.adamw.learning_rate": (0.1, 0.2), "train.steps": (4, 8)}


# ---------------------------------------------------------------------------- lock


def test_lock_held_by_a_live_process_is_refused(tmp_path, capsys, monkeypatch):
    cfg, w = _config(tmp_path), tmp_path / "w"
    w.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        (w / workdirs.LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                   "started": "2026-01-01T00:00:00"}))
        _no_compute(monkeypatch)
        code, _, err = _train(capsys, cfg, w)
        assert code == 2 and f"pid {sleeper.pid}" in err and "in use" in err and "Traceback" not in err
        assert (w / workdirs.LOCK).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    import socket

    cfg, w = _config(tmp_path), tmp_path / "w"
    w.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (w / workdirs.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                               "started": "2026-01-01T00:00:00"}))
    code, _, err = _train(capsys, cfg, w)
    assert code == 0 and "stale lock" in err and f"pid {dead.pid}" in err
    assert not (w / workdirs.LOCK).exists()          # released at exit


def test_lock_of_a_requeued_slurm_job_is_taken_over_from_another_host(tmp_path, monkeypatch, capsys):
    """SLURM requeues a preempted job under the same id with a higher restart count, perhaps on
    another node: its earlier incarnation's lock is stale. Any other foreign lock is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    old = {"pid": 1, "host": "node-that-was-preempted", "started": "2026-01-01T00:00:00",
           "slurm_job": "4242", "slurm_restart": 0}
    for other, refused in [({}, False), ({"slurm_job": "4243"}, True), ({"slurm_restart": 1}, True)]:
        (tmp_path / workdirs.LOCK).write_text(json.dumps({**old, **other}))
        if refused:
            with pytest.raises(ConfigError, match="another host"):
                workdirs.Lock(tmp_path)
            continue
        lock = workdirs.Lock(tmp_path)
        info = json.loads((tmp_path / workdirs.LOCK).read_text())
        assert info["pid"] == os.getpid() and (info["slurm_job"], info["slurm_restart"]) == ("4242", 1)
        assert "requeued" in capsys.readouterr().err
        lock.release()


def test_lock_is_exclusive_and_released_on_exceptions(tmp_path, monkeypatch):
    lock = workdirs.Lock(tmp_path)
    info = json.loads((tmp_path / workdirs.LOCK).read_text())
    assert info["pid"] == os.getpid() and {"host", "started"} <= set(info)
    lock.release()
    assert not (tmp_path / workdirs.LOCK).exists()

    cfg = config_from_dict(TINY)

    class Boom(Exception):
        pass

    def crash(*a, **k):
        raise Boom()

    monkeypatch.setattr(trainer, "loop", crash)
    with pytest.raises(Boom):
        trainer.train(cfg, "adamw", tmp_path / "w")
    assert not (tmp_path / "w" / workdirs.LOCK).exists()


# ---------------------------------------------------------------------------- OS errors


def test_workdir_that_is_a_file(tmp_path, capsys):
    cfg = _config(tmp_path)
    (tmp_path / "w").write_text("not a directory")
    code, _, err = _train(capsys, cfg, tmp_path / "w")
    assert code == 2 and err.startswith("error: ") and "w" in err and "file" in err and "Traceback" not in err


def test_disk_full_during_a_checkpoint_keeps_earlier_ones(tmp_path, capsys, monkeypatch):
    from gn.train import checkpoint

    cfg, w = _config(tmp_path), tmp_path / "w"
    real = checkpoint._fsync_path

    def full(path):
        if "step_00000004" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path)

    monkeypatch.setattr(checkpoint, "_fsync_path", full)
    code, _, err = _train(capsys, cfg, w)
    assert code == 2 and "No space left on device" in err and "step 4" in err and "Traceback" not in err
    assert checkpoint.Checkpointer(w / "checkpoints").steps() == [2]
    assert not list((w / "checkpoints").glob("*partial*"))
    assert [r["step"] for r in _rows(w / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    monkeypatch.setattr(checkpoint, "_fsync_path", real)
    code, out, _ = _train(capsys, cfg, w)                  # space freed: the same command resumes
    assert code == 0 and "resumed from step 2" in out


def test_disk_full_appending_metrics(tmp_path, capsys, monkeypatch):
    cfg, w = _config(tmp_path), tmp_path / "w"
    real_open = Path.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, _):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        if self.name == "metrics.jsonl" and mode == "a" and len(self.read_text().splitlines()) >= 3:
            return Full(f)
        return f

    monkeypatch.setattr(Path, "open", fake_open)
    code, _, err = _train(capsys, cfg, w)
    assert code == 2 and "metrics log" in err and "No space left" in err and "Traceback" not in err
    assert [r["step"] for r in _rows(w / "metrics.jsonl")] == [0, 1, 2]


def _without_root_powers(cmd, env, cwd):
    """Run `cmd` so that file modes apply: root ignores them unless it drops CAP_DAC_OVERRIDE."""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file modes cannot be enforced")
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"] + cmd
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what", ["workdir", "cache", "data_cache"])
def test_read_only_workdir_or_cache_dir(what):
    base = Path(tempfile.mkdtemp(prefix="gn-ro-"))
    try:
        os.chmod(base, 0o755)
        writable, readonly = base / "rw", base / "ro"
        raw = TINY
        if what == "data_cache":
            docs = "".join(json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(200))
            (base / "c4.json.gz").write_bytes(gzip.compress(docs.encode()))
            raw = {**TINY, "data": {"source": "c4", "path": str(base / "c4.json.gz"), "tokenizer": "byte",
                                    "seq_len": 16, "val_sequences": 4, "cache_dir": str(readonly)}}
        cfg = _config(base, raw)
        writable.mkdir(mode=0o777)
        os.chmod(writable, 0o777)
        readonly.mkdir()
        os.chmod(readonly, 0o555)
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env.update(JAX_PLATFORMS="cpu", HOME=str(writable),
                   PYTHONPATH=str(Path(__file__).parent.parent),
                   GN_CACHE_DIR=str(readonly if what == "cache" else writable))
        workdir = readonly / "w" if what == "workdir" else writable / "w"
        out = _without_root_powers([sys.executable, "-m", "gn.cli", "train", str(cfg), "--method", "adamw",
                              "--workdir", str(workdir)], env, str(writable))
        err = " ".join(out.stderr.split())
        assert out.returncode == 2, out.stderr[-2000:]
        assert err.startswith("error: ") and "Permission denied" in err and "Traceback" not in err
        assert {"cache": "compilation cache", "workdir": "workdir", "data_cache": "data cache"}[what] in err
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_damaged_c4_file(tmp_path, capsys):
    docs = b"".join(json.dumps({"text": f"document number {i} " * 8}).encode() + b"\n" for i in range(400))
    data = bytearray(gzip.compress(docs))
    for i in range(len(data) // 2, len(data) // 2 + 40):
        data[i] ^= 0xFF
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    path.write_bytes(bytes(data))
    raw = {**TINY, "data": {"source": "c4", "path": str(path), "tokenizer": "byte", "seq_len": 16,
                            "val_sequences": 4, "cache_dir": str(tmp_path / "cache")}}
    code, _, err = _train(capsys, _config(tmp_path, raw), tmp_path / "w")
    assert code == 2 and err.startswith("error: ") and path.name in err and "Traceback" not in err
    assert "damaged" in err


# ---------------------------------------------------------------------------- config files


def test_empty_config_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    code, _, err = _train(capsys, empty, tmp_path / "w")
    assert code == 2 and f"{empty}' is empty" in err


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("train:\n  steps: 3\nmodel:\n  preset: nano\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="repeats the key 'train' on line 5"):
        load_config(top)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  steps: 3\n  batch_size: 4\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"repeats the key 'steps' on line 4 \(first given on line 2\)"):
        load_config(nested)
    listed = tmp_path / "listed.yaml"
    listed.write_text("methods:\n  - name: adamw\n    learning_rate: 0.1\n    learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="'learning_rate' on line 4"):
        load_config(listed)


# ---------------------------------------------------------------------------- signals


def _popen_train(cfg, workdir, env):
    return subprocess.Popen([sys.executable, "-m", "gn.cli", "train", str(cfg), "--method", "adamw",
                             "--workdir", str(workdir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_checkpoints_then_resume_matches_uninterrupted(tmp_path, sig, code, name):
    raw = {**TINY, "train": {**TINY["train"], "steps": 150, "checkpoint_every": 100, "eval_every": 50}}
    cfg = _config(tmp_path, raw)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = _popen_train(cfg, tmp_path / "stopped", env)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 5):
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    err = " ".join(err.split())
    assert proc.returncode == code, err[-2000:]
    rows = _rows(metrics)
    last = rows[-1]["step"]
    assert 5 <= last < 150 and f"stopped by {name} at step {last}" in err and "rerun the same command" in err
    from gn.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "stopped" / "checkpoints").steps()[-1] == last
    assert not (tmp_path / "stopped" / workdirs.LOCK).exists()
    # Resume (in-process, counting the steps computed) and an uninterrupted run.
    calls = []
    real = trainer._one_step
    try:
        trainer._one_step = lambda sess, step: (calls.append(step), real(sess, step))[1]
        trainer.train(config_from_dict(raw), "adamw", tmp_path / "stopped")
    finally:
        trainer._one_step = real
    assert calls == list(range(last + 1, 151))           # nothing recomputed
    trainer.train(config_from_dict(raw), "adamw", tmp_path / "full")
    assert _strip(_rows(metrics)) == _strip(_rows(tmp_path / "full" / "metrics.jsonl"))


# ---------------------------------------------------------------------------- CLI niceties


def test_warnings_are_one_line_and_version(capsys):
    import warnings

    old = warnings.formatwarning
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["--version"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("gn ") and out.split()[1][0].isdigit()
        text = warnings.formatwarning("something\n odd", UserWarning, "x.py", 3, "source line")
        assert text == "warning: something odd\n"
    finally:
        warnings.formatwarning = old
