"""Per-step metrics log (JSON lines) and the run summary derived from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from gn.errors import os_error


class MetricsLog:
    """Append-only `metrics.jsonl`, one JSON object per step.

    On resume the lines after the restored checkpoint's step are dropped: those
    steps are recomputed, so the finished log equals an uninterrupted run's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only records with record['step'] <= step (all records dropped if step < 0)."""
        rows = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(self.path)
        except OSError as exc:       # the old log stays as it was
            raise os_error(exc, f"rewriting the metrics log {self.path}") from None

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        try:
            with self.path.open("a") as f:
                f.write(line)
                f.flush()
        except OSError as exc:       # at worst a torn last line, which read() ignores
            raise os_error(exc, f"appending to the metrics log {self.path}") from None

    def read(self) -> list[dict]:
        """All complete records (a torn last line from a kill is ignored)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


class MirrorLog(MetricsLog):
    """The run's records kept in memory, by a process that does not write `metrics.jsonl`.

    In a multi-process run only process 0 writes the log (gn.train.distributed); the
    others need the same records (the hooks' history, the summary), so they read
    process 0's file once when the log is truncated to the restored step (before any
    later step can be appended: every step is collective) and then append in memory.
    Records pass through JSON, as process 0's do on their way to the file.
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.rows: list[dict] | None = None

    def truncate_after(self, step: int) -> None:
        self.rows = [r for r in super().read() if r["step"] <= step]

    def append(self, record: dict) -> None:
        if self.rows is None:
            self.rows = []
        self.rows.append(json.loads(json.dumps(record)))

    def read(self) -> list[dict]:
        return list(self.rows) if self.rows is not None else super().read()


def first_crossing(rows: Iterable[dict], target: float, key: str = "val_loss") -> dict | None:
    """The first record whose `key` is at or below `target`."""
    for r in rows:
        v = r.get(key)
        if v is not None and math.isfinite(v) and v <= target:
            return r
    return None


def target_key(t: float) -> str:
    return f"{t:g}"


TO_TARGET = (("steps_to_target", "step"), ("outer_steps_to_target", "outer_step"), ("tokens_to_target", "tokens"),
             ("updates_to_target", "updates"), ("grad_evals_to_target", "grad_evals"),
             ("aux_tokens_to_target", "aux_tokens"), ("wall_time_to_target", "wall_time_s"))


def to_target(evals: list[dict], targets: Iterable[float], key: str) -> dict:
    """{steps_to_target: {target: step}, ...}: the first crossing of each target by `key`."""
    out: dict = {}
    for field, src in TO_TARGET:
        out[field] = {}
        for t in targets:
            hit = first_crossing(evals, t, key)
            out[field][target_key(t)] = hit.get(src) if hit else None
    return out


def summarize(rows: list[dict], targets: Iterable[float], key: str = "val_loss") -> dict:
    """Loss and to-target numbers from the metrics records of one run.

    The *_to_target numbers read `key` (train.target_from: "val_loss" or the EMA's
    "val_loss_ema"); `target_metric` names it. When the other of the two was evaluated too,
    its crossings are under "<other>_to_target" (e.g. val_loss_to_target)."""
    evals = [r for r in rows if r.get("val_loss") is not None]
    vals = [r["val_loss"] for r in evals if math.isfinite(r["val_loss"])]
    last = rows[-1] if rows else {}
    out = {
        "steps": last.get("step", 0),
        "outer_steps": last.get("outer_step", last.get("step", 0)),
        "tokens": last.get("tokens", 0),
        "aux_tokens": last.get("aux_tokens", 0),
        "updates": last.get("updates", 0),
        "grad_evals": last.get("grad_evals", 0.0),
        "initial_val_loss": evals[0]["val_loss"] if evals else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(vals) if vals else None,
        "final_train_loss": next((r["train_loss"] for r in reversed(rows) if "train_loss" in r), None),
    }
    targets = tuple(targets)
    ema = [r["val_loss_ema"] for r in evals if r.get("val_loss_ema") is not None]
    if ema:
        finite = [v for v in ema if math.isfinite(v)]
        out.update(final_val_loss_ema=ema[-1], best_val_loss_ema=min(finite) if finite else None)
    out.update(to_target(evals, targets, key), target_metric=key)
    other = "val_loss" if key == "val_loss_ema" else "val_loss_ema"
    if other == "val_loss" or ema:
        out[f"{other}_to_target"] = to_target(evals, targets, other)
    return out
