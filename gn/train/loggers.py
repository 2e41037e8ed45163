"""Extra metric destinations beside metrics.jsonl: TensorBoard and Weights & Biases.

`train.loggers` (a list of "tensorboard", "wandb") names them. metrics.jsonl
stays the source of truth (summaries, comparisons and resume read only it);
the loggers receive a copy of every record it is given: numeric values as
scalars under their own names, at the record's step.

- tensorboard: event files under WORKDIR/tb, written by tensorboardX
  (`pip install -e ".[tb]"`; `tensorboard --logdir WORKDIR/tb`).
- wandb: one W&B run per method run (project $WANDB_PROJECT, default "gn";
  files under WORKDIR/wandb). `WANDB_MODE=offline` works without network.

A requested logger whose package is missing is a ConfigError raised by the
config's validation, before any compute (`gn.config.check_loggers`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from gn.config import check_loggers
from gn.train.metrics import MetricsLog

def scalars(record: dict) -> dict[str, float]:
    """The record's finite numeric values (not the step itself, not flags)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoardLogger:
    def __init__(self, workdir: Path, name: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(workdir / "tb"), flush_secs=30)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)
        if "val_loss" in record:   # evaluations are rare and what a person watches: flush them now
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, workdir: Path, name: str, config: dict | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gn"), name=name, dir=str(workdir),
                              config=config, reinit=True)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class LoggedMetricsLog(MetricsLog):
    """metrics.jsonl, and a copy of each appended record to every logger."""

    def __init__(self, path: str | Path, loggers: list[Any]):
        super().__init__(path)
        self.loggers = loggers

    def append(self, record: dict) -> None:
        super().append(record)
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def open_metrics_log(workdir: Path, names, *, run_name: str = "", config: dict | None = None) -> MetricsLog:
    """workdir/metrics.jsonl with the loggers `names` attached (a plain MetricsLog if none)."""
    path = Path(workdir) / "metrics.jsonl"
    if not names:
        return MetricsLog(path)
    check_loggers(names)
    made = []
    for name in names:
        made.append(TensorBoardLogger(Path(workdir), run_name) if name == "tensorboard"
                    else WandbLogger(Path(workdir), run_name, config))
    return LoggedMetricsLog(path, made)


def close_metrics_log(log: MetricsLog) -> None:
    close = getattr(log, "close", None)
    if close is not None:
        close()
