"""The local sweep runner: the manifest's runs in order, in one process.

In-process (`gn.train.trainer.train`) rather than one `gn train` per run, so
JAX, the data and the persistent XLA cache stay warm between runs. Each run's
outcome goes to RUN/sweep_run.json; a rerun skips finished runs, resumes
interrupted ones (the trainer restarts from the run's checkpoints), and retries
failed or diverged runs only with `retry_failed`. A run trained elsewhere (the
SLURM array) that wrote summary.json but no sweep_run.json is recorded from its
summary without training, so `gn sweep SPEC` after the array also collects.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable

from gn.config import load_config
from gn.errors import ConfigError, require
from gn.train import trainer
from gn.train.hooks import stop_holds, stop_keys
from gn.train.metrics import MetricsLog

MANIFEST = "manifest.jsonl"      # one JSON line per run, written by `gn sweep`, read here and by the SLURM array


def read_manifest(sweep_dir: Path) -> list[dict]:
    """The manifest's rows, in order."""
    path = Path(sweep_dir) / MANIFEST
    require(path.is_file(), f"No sweep manifest at '{path}'.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

RUN_RECORD = "sweep_run.json"
STATUS = "status.json"
DONE = ("finished",)
NOT_RETRIED = ("diverged", "failed")
RECORD_KEYS = ("method", "registered_method", "batch_size", "learning_rate", "seed", "steps", "tokens", "vary",
               "schedule_tied_to_horizon", "warmup_steps", "eval_every", "min_evals", "targets")
LOSS_KEYS = ("val_loss", "val_loss_ema")


def run_manifest(sweep_dir: str | Path, *, retry_failed: bool = False, only: list[int] | None = None,
                 max_runs: int | None = None, train_fn: Callable | None = None) -> list[dict]:
    """Run (or skip) the manifest's runs in order; return each visited run's record.

    `only`: manifest ids to consider; `max_runs`: stop after training this many
    runs; `train_fn`: the trainer (tests count its calls).
    """
    from tqdm.auto import tqdm

    sweep_dir = Path(sweep_dir)
    rows = read_manifest(sweep_dir)
    if only is not None:
        unknown = sorted(set(only) - {r["id"] for r in rows})
        if unknown:
            raise ConfigError(f"--only: no runs with ids {unknown}; the manifest has ids 0-{len(rows) - 1}.")
        rows = [r for r in rows if r["id"] in set(only)]
    records, trained = [], 0
    bar = tqdm(total=len(rows), desc="sweep", unit="run", dynamic_ncols=True)
    try:
        for row in rows:
            if max_runs is not None and trained >= max_runs:
                break
            record, did_train = _visit(row, retry_failed, train_fn)
            trained += did_train
            records.append(record)
            bar.update(1)
            bar.write(_line(row, record, did_train))
    finally:
        bar.close()
    counts = {s: sum(r["status"] == s for r in records) for s in ("finished", "diverged", "failed")}
    print(f"sweep {sweep_dir}: {len(records)} runs visited, {trained} trained; "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return records


def _visit(row: dict, retry_failed: bool, train_fn: Callable | None) -> tuple[dict, bool]:
    """One run: skip it if it has an outcome, else train it and record the outcome."""
    rundir = Path(row["workdir"])
    old = read_record(rundir)
    if old is not None and (old["status"] in DONE or (old["status"] in NOT_RETRIED and not retry_failed)) \
            and not _reopened(rundir, row, old):
        return old, False
    summary_path = rundir / "summary.json"
    if old is None and summary_path.is_file():          # trained by `gn train` (e.g. the SLURM array)
        return _write(rundir, row, json.loads(summary_path.read_text()), None), False
    _status(rundir, "running")
    try:
        cfg = load_config(rundir / "config_in.yaml")
        if train_fn is None:
            train_fn = trainer.train      # looked up at call time (tests replace it)
        summary = train_fn(cfg, row["method"], rundir)
    except KeyboardInterrupt:
        _status(rundir, "interrupted")
        raise
    except Exception as exc:   # a failed run is recorded and the sweep goes on
        (rundir / "error.txt").write_text(traceback.format_exc())
        return _write(rundir, row, None, f"{type(exc).__name__}: {exc}"), True
    return _write(rundir, row, summary, None), True


def _reopened(rundir: Path, row: dict, old: dict) -> bool:
    """A finished run whose early stop no longer holds under its config_in.yaml (stopped at the
    EMA's crossing before `gn sweep` waited for the raw one too, gn.train.hooks.stop_holds): the
    trainer continues it from its last checkpoint."""
    if old["status"] != "finished" or old.get("stop_reason") not in ("targets_reached", "stalled"):
        return False
    try:
        cfg = load_config(rundir / "config_in.yaml")
    except ConfigError:
        return False          # the trainer would refuse it too: keep the recorded outcome
    entry = next((e for e in cfg.methods if e.name == row["method"]), None)
    keys = stop_keys(cfg.train, entry.target_from if entry is not None else None)
    return not stop_holds(cfg.train, keys, MetricsLog(rundir / "metrics.jsonl").read(), old["stop_reason"])


def read_record(rundir: str | Path) -> dict | None:
    """RUN/sweep_run.json, or None when the run has no outcome yet."""
    path = Path(rundir) / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _write(rundir: Path, row: dict, summary: dict | None, error: str | None) -> dict:
    if error is not None:
        status, reason = "failed", error
    elif summary.get("diverged"):
        status, reason = "diverged", summary.get("divergence") or f"diverged at step {summary.get('steps')}"
    else:
        status, reason = "finished", summary.get("stop_reason", "steps")
    record = {**{k: row.get(k) for k in RECORD_KEYS}, "status": status, "reason": reason,
              "workdir": row["workdir"]}
    if summary is not None:
        record.update(stop_reason=summary.get("stop_reason"), steps=summary.get("steps"),
                      tokens=summary.get("tokens"), final_val_loss=summary.get("final_val_loss"),
                      best_val_loss=summary.get("best_val_loss"), wall_time_s=summary.get("wall_time_s"))
        record.update(_cadence_check(rundir, row))
    (rundir / RUN_RECORD).write_text(json.dumps(record, indent=2))
    _status(rundir, status)
    return record


def evals_to_target(rows: list[dict], targets: list[float]) -> dict:
    """{target: {loss key: evaluations after step 0 up to and including the first at or below the
    target}} for val_loss (and val_loss_ema where logged); a target never reached is left out."""
    evals = [r for r in rows if r.get("step", 0) > 0]
    out: dict = {}
    for t in targets:
        for key in LOSS_KEYS:
            seen = [r[key] for r in evals if r.get(key) is not None]
            hit = next((i for i, v in enumerate(seen) if v <= t), None)
            if hit is not None:
                out.setdefault(f"{t:g}", {})[key] = hit + 1
    return out


def _cadence_check(rundir: Path, row: dict) -> dict:
    """The run's evaluations before each crossing, and the crossings evaluated more coarsely than
    the spec's `min_evals` asks (only possible when the cadence is coarser than every step: then
    `crossing_tokens` was above the run's tokens to target; lower it to a pilot's value)."""
    path = rundir / "metrics.jsonl"
    targets, need = row.get("targets") or [], row.get("min_evals") or 0
    if not targets or not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts = evals_to_target(rows, targets)
    sparse = [f"{t} ({key})" for t, per in counts.items() for key, n in per.items()
              if n < need and (row.get("eval_every") or 1) > 1]
    return {"evals_to_target": counts, "sparse_crossings": sparse}


def _status(rundir: Path, status: str) -> None:
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / STATUS).write_text(json.dumps({"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def _line(row: dict, record: dict, trained: bool) -> str:
    what = "ran" if trained else "skip"
    loss = record.get("final_val_loss")
    loss_txt = f" val {loss:.4f}" if isinstance(loss, float) else ""
    wall = record.get("wall_time_s")
    wall_txt = f" {wall:.1f}s" if isinstance(wall, (int, float)) and trained else ""
    sparse = record.get("sparse_crossings")
    warn = (f"; warning: fewer than {row.get('min_evals')} evaluations (every {row.get('eval_every')} steps) "
            f"before crossing {', '.join(sparse)}: lower crossing_tokens" if sparse else "")
    return (f"[{row['id']}] {what} {record['status']:<8} {row['method']} B={row['batch_size']} "
            f"lr={row['learning_rate']:.3g} seed={row['seed']}{loss_txt}{wall_txt} ({record['reason']}){warn}")
