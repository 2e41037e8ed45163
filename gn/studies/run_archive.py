"""A study's runs in one committed file, so that its analysis can be redone and extended
without the run directories.

Run directories (`runs/...`) are scratch: they are not committed, and a fresh machine has
none, so the runs behind a committed analysis.json are gone with the machine that made them
and a later session could neither add a seed to a cell nor refit. `gn analyze` therefore
writes `runs.jsonl.gz` next to analysis.json: one line per run, holding the record
`gn.studies.inputs.run_record` builds from its directory (identity, stop reason, targets and,
per evaluation, every axis of `inputs.AXES` and both validation losses). JSON floats
round-trip exactly, so analysing the archive alone reproduces analysis.json bit for bit, and

    gn analyze runs/batch_vs_inner experiments/results/batch_vs_inner/raw/runs.jsonl.gz --out ...

analyses this session's new runs together with the committed ones. A run is named by its
directory's name (method, batch, lr, seed and config digest, `gn.studies.spec`); one found
both in a directory and in an archive is read from the directory, which is the newer state
(a run continued under a changed stop rule). Runs are analysed in the order of their names,
whatever the order of the sources. The file is written deterministically (sorted,
gzip without a timestamp): the same runs give the same bytes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Sequence

from gn.errors import ConfigError, require
from gn.studies.inputs import AXES, READS, add_compute, find_run_dirs, run_record, with_read

ARCHIVE_NAME = "runs.jsonl.gz"
FORMAT = {"format": "gn-run-archive", "version": 1}
# Per evaluation: every axis but `compute` (derived again on reading), both losses.
EVAL_FIELDS = tuple(f for f in AXES if f != "compute") + ("val_loss", "val_loss_ema")
RUN_FIELDS = ("dir", "method", "registered", "whole_outer_steps", "updates_per_outer_step", "batch_size",
              "learning_rate", "seed", "diverged", "stop_reason", "targets", "has_ema")


def is_archive(path: str | Path) -> bool:
    """Whether `path` names an archive file (rather than a run directory)."""
    p = Path(path)
    return p.name.endswith(".jsonl.gz") and not p.is_dir()


def _line(run: dict) -> dict:
    out = {k: run[k] for k in RUN_FIELDS}
    out["evals"] = [{k: r[k] for k in EVAL_FIELDS if k in r} for r in run["evals"]]
    return out


def write_archive(runs: Iterable[dict], path: str | Path) -> Path:
    """Write `runs` (records of `run_record` / `read_archive`) to `path`, sorted by run name."""
    p = Path(path)
    lines = [json.dumps(FORMAT)]
    for run in sorted(runs, key=lambda r: (Path(r["dir"]).name, r["dir"])):
        lines.append(json.dumps(_line(run), allow_nan=True))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    tmp.replace(p)   # atomic: an interrupted write never leaves half an archive
    return p


def _check_run(rec, where: str) -> dict:
    require(isinstance(rec, dict), f"{where}: a run record must be a JSON object.")
    missing = [k for k in RUN_FIELDS + ("evals",) if k not in rec]
    require(not missing, f"{where}: run record lacks {', '.join(missing)}.")
    require(isinstance(rec["evals"], list) and all(isinstance(e, dict) for e in rec["evals"]),
            f"{where}: evals must be a list of objects.")
    b, lr = rec["batch_size"], rec["learning_rate"]
    require(isinstance(b, (int, float)) and b > 0 and isinstance(lr, (int, float)) and lr > 0,
            f"{where}: batch_size and learning_rate must be positive numbers, got {b!r}, {lr!r}.")
    for i, e in enumerate(rec["evals"]):
        v = e.get("val_loss")
        require(isinstance(v, (int, float)) and not isinstance(v, bool),
                f"{where}: evaluation {i} has no numeric val_loss ({v!r}).")
    return rec


def read_archive(path: str | Path) -> list[dict]:
    """The run records of an archive, each as `run_record` returns it (`compute` derived again).
    Raises ConfigError naming the file and line of the first bad record, before any analysis."""
    p = Path(path)
    require(p.is_file(), f"run archive '{p}' not found.")
    try:
        text = gzip.decompress(p.read_bytes()).decode()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read run archive '{p}': {exc}") from None
    recs = []   # (line number in the file, record)
    for i, ln in enumerate(text.split("\n"), start=1):
        if ln.strip():
            try:
                recs.append((i, json.loads(ln)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"run archive '{p}' line {i}: not JSON: {exc}") from None
    require(bool(recs) and recs[0][1] == FORMAT,
            f"'{p}' is not a gn run archive (its first line must be {json.dumps(FORMAT)}).")
    runs = [_check_run(r, f"run archive '{p}' line {i}") for i, r in recs[1:]]
    for r in runs:
        add_compute(r["evals"], r["batch_size"])
    return runs


def load_runs(sources: Sequence[str | Path], read: str = "auto") -> list[dict]:
    """The runs of `sources` (run directories, folders holding them, archives), read as `read`.
    A run in a directory replaces an archived one of the same name; two archives naming one run
    keep the first. Raises ConfigError for a source holding no run."""
    require(read in READS, f"--read must be one of {', '.join(READS)}, got '{read}'.")
    require(bool(sources), "no run directories or archives given.")
    dirs = [s for s in sources if not is_archive(s)]
    runs = [run_record(d) for d in find_run_dirs(dirs)] if dirs else []
    names = {Path(r["dir"]).name for r in runs}
    for s in (s for s in sources if is_archive(s)):
        archived = read_archive(s)
        require(bool(archived), f"run archive '{s}' holds no run.")
        for r in archived:
            if Path(r["dir"]).name not in names:
                names.add(Path(r["dir"]).name)
                runs.append(r)
    # One order whatever the order of the sources (the bootstrap resamples in row order): by run name.
    return [with_read(r, read) for r in sorted(runs, key=lambda r: (Path(r["dir"]).name, r["dir"]))]


__all__ = ["ARCHIVE_NAME", "EVAL_FIELDS", "FORMAT", "is_archive", "load_runs", "read_archive", "write_archive"]
