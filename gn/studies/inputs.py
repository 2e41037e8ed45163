"""What `gn analyze` reads: run directories (summary.json, config.yaml, metrics.jsonl,
sweep_run.json) or a steps-to-target CSV, each reduced to rows of the same form.

A run becomes its evaluations (every record with a validation loss, `compute` added:
grad_evals × batch = forward-backward passes over one sequence) and, per target, one
row with every axis at the crossing at the method's resolution (gn.studies.cbs). A
table is validated whole, naming the column and row of the first bad value, before
any analysis.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from gn.errors import ConfigError, require
from gn.methods import registry
from gn.studies import cbs
from gn.train.metrics import MetricsLog, target_key

# metrics.jsonl field -> name of the to-target quantity in the analysis. `compute` is derived:
# grad_evals (value_and_grad equivalents at the run's batch) × batch size = forward-backward
# passes over one sequence, comparable across batch sizes.
AXES = {"step": "steps", "outer_step": "outer_steps", "tokens": "tokens", "aux_tokens": "aux_tokens",
        "updates": "updates", "grad_evals": "grad_evals", "compute": "compute", "wall_time_s": "wall_time_s"}
TABLE_REQUIRED = ("method", "batch_size", "learning_rate", "seed", "target", "steps_to_target")


def _num(x) -> float | int:
    """Integral floats as int, so batch sizes keep the units and look of the input."""
    x = float(x)
    return int(x) if x.is_integer() else x


def find_run_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """Run directories among `dirs`: each is a run (holds summary.json) or a
    parent searched recursively. Raises ConfigError if one holds no run."""
    found: list[Path] = []
    for d in map(Path, dirs):
        require(d.is_dir(), f"'{d}' is not a directory (gn analyze takes run directories, run archives or --table FILE.csv).")
        runs = [d] if (d / "summary.json").is_file() else sorted(p.parent for p in d.rglob("summary.json"))
        require(bool(runs), f"no run directories (with summary.json) under '{d}'.")
        found += [r for r in runs if r not in found]
    return found


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read '{p}': {exc}") from None


READS = ("auto", "raw", "ema")


def run_record(d: Path) -> dict:
    """One run directory as a dict, whatever reading is analysed: method, batch_size,
    learning_rate, seed, diverged, stop_reason, targets (from config.yaml), has_ema and evals
    (the metrics records with a validation loss, `compute` added). sweep_run.json, when
    present, names method, batch, learning rate and seed; otherwise they come from
    summary.json/config.yaml. `gn.studies.run_archive` stores exactly this record."""
    summary = _read_json(d / "summary.json")
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    cfg = cfg or {}
    sweep = _read_json(d / "sweep_run.json") if (d / "sweep_run.json").is_file() else {}
    train = cfg.get("train") or {}
    hp = summary.get("hparams") or {}
    reg = summary.get("registered_method", summary.get("method"))
    lr_keys = ("learning_rate", "inner_learning_rate")
    if reg in registry.names() and registry.get(reg).lr_key != lr_keys[0]:
        lr_keys = lr_keys[::-1]
    lr = sweep.get("learning_rate", next((hp[k] for k in lr_keys if hp.get(k) is not None), None))
    require(lr is not None, f"run '{d}' names no learning rate (neither sweep_run.json nor summary.json hparams).")
    batch = sweep.get("batch_size", summary.get("batch_size", train.get("batch_size")))
    require(batch is not None, f"run '{d}' names no batch size.")
    rows = MetricsLog(d / "metrics.jsonl").read()
    evals = add_compute([r for r in rows if r.get("val_loss") is not None], batch)
    whole = bool(reg in registry.names() and registry.get(reg).whole_outer_steps)
    last = evals[-1] if evals else {}
    per_outer = (float(last["updates"]) / float(last["outer_step"])
                 if last.get("updates") and last.get("outer_step") else None)
    return {"dir": str(d), "method": str(sweep.get("method", summary.get("method", d.name))),
            "registered": reg, "whole_outer_steps": whole, "updates_per_outer_step": per_outer,
            "batch_size": _num(batch), "learning_rate": float(lr), "seed": sweep.get("seed", train.get("seed", 0)),
            "diverged": bool(summary.get("diverged", False)) or any(r.get("diverged") for r in rows),
            "stop_reason": summary.get("stop_reason"),
            "targets": [float(t) for t in train.get("target_losses") or []],
            "has_ema": bool(evals) and all(r.get("val_loss_ema") is not None for r in evals),
            "evals": evals}


def add_compute(evals: list[dict], batch) -> list[dict]:
    """`compute` on every evaluation: grad_evals × batch (forward-backward passes over one sequence)."""
    for r in evals:
        if r.get("grad_evals") is not None:
            r["compute"] = float(r["grad_evals"]) * float(batch)
    return evals


def with_read(run: dict, read: str = "auto") -> dict:
    """`run` (a `run_record`) with `read_from`, the loss its crossings are read from. With
    weight averaging on, the EMA is what a crossing is read from by default (the paper evaluates
    it); `read` = raw or ema forces one (ema: ConfigError for a run without an EMA)."""
    require(read != "ema" or run["has_ema"],
            f"--read ema: run '{run['dir']}' logged no val_loss_ema (train.ema_decay was 0).")
    return run | {"read_from": "val_loss_ema" if run["has_ema"] and read != "raw" else "val_loss"}


def load_run(d: Path, read: str = "auto") -> dict:
    """One run directory read as `read` (auto, raw, ema): `with_read(run_record(d), read)`."""
    return with_read(run_record(d), read)


def run_rows(run: dict, targets: Sequence[float]) -> list[dict]:
    """One row per target: every axis at the crossing of the validation loss (the EMA's when
    the run averaged weights), at the method's resolution (`cbs.crossing_resolved`): the first
    evaluation at or below the target for a method that moves only at whole outer steps,
    the linear interpolation otherwise; each with its bracket. A diverged run counts as not
    reached, whatever its curve did before it diverged."""
    ev = run["evals"]
    axes = {field: [r.get(field) for r in ev] for field in AXES}
    out = []
    for t in targets:
        hit = cbs.crossing_resolved(axes, [r[run["read_from"]] for r in ev], t, whole_steps=run["whole_outer_steps"])
        row = {k: run[k] for k in ("method", "batch_size", "learning_rate", "seed", "diverged")}
        row["target"] = target_key(t)
        row.update({AXES[f]: (None if run["diverged"] else v) for f, v in hit["value"].items()})
        row["bracket"] = {AXES[f]: (None if run["diverged"] else v) for f, v in hit["bracket"].items()}
        row["crossing_rule"], row["read_from"] = hit["rule"], run["read_from"]
        row["updates_per_outer_step"] = run["updates_per_outer_step"]
        out.append(row)
    return out


def _final_loss(run: dict) -> float | None:
    key = run.get("read_from", "val_loss")
    vals = [r[key] for r in run["evals"] if r.get(key) is not None and math.isfinite(r[key])]
    return None if run["diverged"] or not vals else vals[-1]


def loss_at_tokens(run: dict, tokens: int) -> float | None:
    """The validation loss of the evaluation at exactly `tokens` training tokens: the loss a run with
    that budget would have ended at, when nothing in the run depends on its total budget (a constant
    schedule, a warmup and an EMA counted in updates, as in experiments/fixed_tokens_v2.yaml). None
    when the run diverged before it or its loss there is not finite; ConfigError when the run ended
    short of it without diverging or never evaluated at exactly that count."""
    key = run.get("read_from", "val_loss")
    at = [e for e in run["evals"] if e.get("tokens") == tokens]
    if at:
        v = at[-1].get(key)
        return float(v) if v is not None and math.isfinite(v) else None
    last = max((e.get("tokens") or 0 for e in run["evals"]), default=0)
    if last < tokens and run["diverged"]:
        return None
    near = sorted({e.get("tokens") for e in run["evals"] if e.get("tokens") is not None})
    where = f"it ended at {last:,}" if last < tokens else "it evaluated at " + ", ".join(f"{t:,}" for t in near[:12])
    raise ConfigError(f"run {run['dir']} has no evaluation at {tokens:,} tokens ({where}); "
                      "--fixed-tokens-at needs a budget every run evaluated at (a multiple of eval_every_tokens).")


# ---------------------------------------------------------------- table

def read_table(path: str | Path) -> list[dict]:
    """Rows of a steps-to-target CSV. Validates everything before any analysis:
    a missing column, an empty table or an unparsable number raises ConfigError
    naming the column and the row (1 = the header line)."""
    p = Path(path)
    require(p.is_file(), f"table '{p}' not found.")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in TABLE_REQUIRED if c not in cols]
        require(not missing, f"table '{p}' lacks the column(s) {', '.join(missing)}; "
                             f"required: {','.join(TABLE_REQUIRED)} (tokens_to_target optional).")
        raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    require(bool(raw), f"table '{p}' has no rows.")
    rows = []
    for line, r in enumerate(raw, start=2):
        def number(col, *, optional=False, positive=False):
            text = r.get(col, "")
            if text == "" and optional:
                return None
            try:
                x = float(text)
            except ValueError:
                raise ConfigError(f"table '{p}' row {line}: column {col} is not a number: '{text}'.") from None
            require(math.isfinite(x) and (x > 0 if positive else True),
                    f"table '{p}' row {line}: column {col} must be a finite{' positive' if positive else ''} "
                    f"number, got '{text}'.")
            return x
        require(r["method"] != "", f"table '{p}' row {line}: column method is empty.")
        number("target")
        row = {"method": r["method"], "batch_size": _num(number("batch_size", positive=True)),
               "learning_rate": number("learning_rate", positive=True), "seed": _num(number("seed")),
               "target": r["target"], "steps": number("steps_to_target", optional=True), "diverged": False}
        if "tokens_to_target" in cols:
            row["tokens"] = number("tokens_to_target", optional=True)
        rows.append(row)
    return rows


__all__ = ["AXES", "READS", "TABLE_REQUIRED", "add_compute", "find_run_dirs", "load_run", "read_table", "run_record",
           "run_rows", "with_read"]
