"""A workdir belongs to one run: one process at a time, one resolved config.

`claim(run, workdir, branch=...)` is entered by `train()` before any compute:

* Lock. `workdir/train.lock`, one process at a time (gn/train/lock.py: stale locks,
  other hosts, requeued SLURM jobs).
* Config drift. When `workdir/config.yaml` exists, the new resolved config (the
  one `setup` writes: this method only, model.vocab_size filled in) must equal
  it, except for `train.steps` (extend or shorten a run; schedules over the
  total steps are then computed for the new length), `train.progress` and the
  parameter sharding (`train.fsdp`, `train.fsdp_min_size`: a checkpoint restores
  onto any mesh).
  Otherwise ConfigError names every differing key (old -> new) and suggests
  `--branch`.
* Finished runs. When summary.json exists and the run reached its last step, or
  stopped early for a recorded reason (train.max_tokens, train.stop_at_target,
  train.stop_after_rejected) that still holds under the config, nothing is trained: the
  stored summary is returned. A run stopped under another stop rule (at the EMA's crossing
  where train.stop_reads now waits for the raw one too) continues from its last checkpoint. A diverged run is final
  too (a rerun would diverge the same way; `gn train` exits 3 again): change the
  config in a new workdir or with `--branch`.
* Branching (`gn train ... --workdir SRC --branch NEW`): NEW starts as a copy of
  SRC's newest verified checkpoint and its metrics up to that step (plus
  branch.json recording the source, step and changed keys), and continues there
  with the new config; SRC is left untouched. The model and the registered
  method must stay the same (the parameters and optimizer state are reused).
  Rerunning the branch command once NEW exists simply resumes NEW.
* Several processes (`jax.distributed`): process 0 alone takes the lock and makes
  these checks, and every process gets its verdict (gn.train.distributed), so a
  second launch on a busy workdir is refused once, in every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml

from gn.config import config_from_dict
from gn.model.custom import FlaxLM
from gn.errors import ConfigError, RunError, os_error, require
from gn.train import distributed
from gn.train.checkpoint import Checkpointer
from gn.train.hooks import stop_holds, stop_keys
from gn.train.lock import LOCK, Lock
from gn.train.metrics import MetricsLog

BRANCH = "branch.json"
# Keys that may differ from the stored config on resume.
# The mesh layout is not part of a run: checkpoints restore onto any device count.
# The early-stop rules change when a run stops, not what it computes: a run stopped under an older
# rule continues (finished_summary).
RESUMABLE_KEYS = ("train.steps", "train.progress", "train.fsdp", "train.fsdp_min_size", "train.stop_reads",
                  "train.stop_after_rejected")
# Stop reasons (summary.json) that end a run before its last step for good.
FINAL_STOPS = ("max_tokens", "targets_reached", "stalled")


@dataclasses.dataclass
class Claim:
    workdir: Path                 # where the run trains (the branch directory with --branch)
    finished: dict | None = None  # the stored summary of a finished run: nothing to do


# ---------------------------------------------------------------------------- config drift


def resolved_config(run) -> Any:
    """The single-method config `setup` writes to workdir/config.yaml."""
    # A FlaxLM (gn.model.custom) is not a config: the config's model section stays as written.
    model = run.cfg.model if isinstance(run.model_cfg, FlaxLM) else run.model_cfg
    return dataclasses.replace(run.cfg, model=model, methods=(run.entry,))


def _normal(raw: dict) -> dict:
    """A stored config as the current code resolves it (new keys get their defaults)."""
    try:
        return yaml.safe_load(yaml.safe_dump(config_from_dict(raw).to_dict(), sort_keys=False))
    except (ConfigError, ValueError, TypeError):
        return raw


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaves; lists of named entries (methods) keyed by their names."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if (isinstance(tree, list) and tree and all(isinstance(e, dict) and "name" in e for e in tree)
            and len({e["name"] for e in tree}) == len(tree)):
        out = {}
        for e in tree:
            out.update(flatten({k: v for k, v in e.items() if k != "name"}, f"{prefix}.{e['name']}"))
        return out
    return {prefix: tree}


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old, new)} for every key whose value differs."""
    a, b = flatten(old), flatten(new)
    missing = "<absent>"
    pairs = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))}
    return {k: (o, n) for k, (o, n) in pairs.items() if o != n}


def _fmt(diff: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {json.dumps(o, default=str)} -> {json.dumps(n, default=str)}" for k, (o, n) in diff.items())


def _stored(workdir: Path) -> dict | None:
    path = workdir / "config.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise os_error(exc, f"reading {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"The workdir's config {path} is not valid YAML ({exc}); move the workdir aside "
                          f"or use another --workdir.") from None
    require(isinstance(raw, dict), f"The workdir's config {path} does not hold a config; move it aside.")
    return _normal(raw)


def _new(run) -> dict:
    return yaml.safe_load(yaml.safe_dump(resolved_config(run).to_dict(), sort_keys=False))


def check_drift(run, workdir: Path) -> None:
    """ConfigError when workdir/config.yaml differs from the run's resolved config
    in keys that may not change on resume."""
    old = _stored(workdir)
    if old is None:
        return
    diff = config_diff(old, _new(run))
    blocking = {k: v for k, v in diff.items() if k not in RESUMABLE_KEYS}
    if blocking:
        raise ConfigError(
            f"The workdir {workdir} belongs to a run with another config; it differs in {len(blocking)} "
            f"key(s): {_fmt(blocking)}. To continue that run with the new config in a new directory, add "
            f"`--branch NEW_WORKDIR` (it starts from this run's latest checkpoint); to start over, use another "
            f"--workdir; to resume this run, use its config ({workdir / 'config.yaml'}).")
    if "train.steps" in diff:
        o, n = diff["train.steps"]
        print(f"warning: train.steps changed {o} -> {n} on {workdir}: the run continues to step {n}; "
              f"learning-rate schedules now span {n} steps", file=sys.stderr, flush=True)


def finished_summary(run, workdir: Path) -> dict | None:
    """The stored summary when the run in `workdir` is complete for this config, else None."""
    path = workdir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("diverged") or summary.get("stop_reason") == "diverged":
        return summary          # a rerun would diverge the same way: report it, do not retrain
    reason = summary.get("stop_reason")
    if reason in FINAL_STOPS and not _stop_holds(run, workdir, reason):
        return None             # stopped under another stop rule: continue from the last checkpoint
    if reason in FINAL_STOPS or summary.get("steps", -1) >= run.steps:
        return summary
    return None


def _stop_holds(run, workdir: Path, reason: str) -> bool:
    tcfg = run.cfg.train
    return stop_holds(tcfg, stop_keys(tcfg, run.entry.target_from), MetricsLog(workdir / "metrics.jsonl").read(), reason)


# ---------------------------------------------------------------------------- branch


def _branch(run, source: Path, target: Path) -> None:
    """Create `target` as a copy of `source`'s newest checkpoint and metrics (atomically)."""
    old = _stored(source)
    require(old is not None, f"--branch: the source workdir {source} holds no run (no config.yaml).")
    diff = config_diff(old, _new(run))
    fixed = {k: v for k, v in diff.items() if k.startswith("model.") or k.endswith(".method")
             or k == "methods" or k.startswith("methods.") and k.count(".") == 1}
    require(not fixed, f"--branch continues the parameters and optimizer state of {source}, so the model and the "
                       f"method must stay the same; they differ in: {_fmt(fixed)}. Use a fresh --workdir instead.")
    ckpt_dir = source / "checkpoints"
    steps = Checkpointer(ckpt_dir).steps() if ckpt_dir.is_dir() else []
    require(bool(steps), f"--branch: the source workdir {source} holds no finished checkpoint to branch from.")
    step = steps[-1]
    tmp = target.with_name(f".{target.name}.branching-{uuid.uuid4().hex[:8]}")
    try:
        (tmp / "checkpoints").mkdir(parents=True)
        name = f"step_{step:08d}"
        shutil.copytree(ckpt_dir / name, tmp / "checkpoints" / name)
        if (source / "metrics.jsonl").is_file():
            shutil.copy2(source / "metrics.jsonl", tmp / "metrics.jsonl")
        (tmp / BRANCH).write_text(json.dumps({
            "source": str(source.resolve()), "step": step,
            "changed": {k: list(v) for k, v in diff.items()}}, indent=2, default=str))
        if target.is_dir():
            target.rmdir()           # an empty directory (checked by the caller)
        os.rename(tmp, target)
    except OSError as exc:
        raise os_error(exc, f"branching {source} into {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"branched {target} from {source} at step {step}" + (f" ({_fmt(diff)})" if diff else ""),
          file=sys.stderr, flush=True)


def _prepare_branch(run, source: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise os_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), f"using {target} as a workdir")
    if target.is_dir() and ((target / "config.yaml").is_file() or (target / BRANCH).is_file()):
        return                                   # made by an earlier branch command: resume it
    require(not target.is_dir() or not any(target.iterdir()),
            f"--branch {target}: the directory exists and is not empty; choose a new directory.")
    require(source.resolve() != target.resolve(), "--branch needs a directory other than the source --workdir.")
    target.parent.mkdir(parents=True, exist_ok=True)
    src_lock = Lock(source) if source.is_dir() else None   # no run may change the source while we copy
    try:
        _branch(run, source, target)
    finally:
        if src_lock is not None:
            src_lock.release()


# ---------------------------------------------------------------------------- claim


def _mkdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:   # a file stands there
        raise os_error(OSError(errno.ENOTDIR, "it is an existing file, not a directory"),
                       f"using {workdir} as the workdir") from exc
    except OSError as exc:
        raise os_error(exc, f"creating the workdir {workdir}") from None


@contextlib.contextmanager
def claim(run, workdir: Path, *, branch: str | Path | None = None) -> Iterator[Claim]:
    """Lock the workdir (the branch directory with `branch`), refuse config drift,
    and report a finished run; release the lock at exit."""
    source = Path(workdir)
    workdir = Path(branch) if branch is not None else source
    held: list[Lock] = []

    def take() -> dict | None:
        if branch is not None:
            _prepare_branch(run, source, workdir)
        _mkdir(workdir)
        lock = Lock(workdir)
        try:
            check_drift(run, workdir)
            finished = finished_summary(run, workdir)
        except BaseException:
            lock.release()
            raise
        held.append(lock)
        return finished

    # Several processes, one run: process 0 takes the lock and checks the workdir; every process
    # gets its verdict (a refusal is raised everywhere and printed once: gn.train.distributed).
    finished = distributed.primary_decides(take)
    try:
        yield Claim(workdir, finished)
    finally:
        for lock in held:
            lock.release()


def restore(ckpt, abstract_state: Any, workdir: Path):
    """`ckpt.restore_latest`, with a checkpoint that does not fit the state refused cleanly."""
    try:
        return ckpt.restore_latest(abstract_state)
    except RuntimeError as exc:
        raise ConfigError(
            f"The checkpoints in {workdir} do not fit this run's model and optimizer state ({str(exc)[:300]}). "
            f"The model or method changed since they were written: use another --workdir.") from None


def check_writable_dir(path: Path, what: str) -> None:
    """RunError unless `path` (created if missing) accepts a new file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gn-write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise os_error(exc, f"writing to {what} {path}") from None


__all__ = ["claim", "Claim", "Lock", "LOCK", "check_drift", "config_diff", "finished_summary", "restore",
           "check_writable_dir", "RunError"]
