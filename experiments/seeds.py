"""Run a comparison over several seeds and aggregate per method.

    python experiments/seeds.py configs/quickstart.yaml --seeds 0,1,2 [--workdir DIR] [--set k=v ...]

Each seed changes the initialisation and the data order (train.seed). For every
method and target it prints mean ± standard error over the seeds that reached
the target (and how many did), and writes `DIR/seeds.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from gn.runtime import configure_jax_env

configure_jax_env()   # before jax is imported (by gn.config): platform, persistent compile cache

from gn.config import load_config  # noqa: E402
from gn.train.compare import compare  # noqa: E402
from gn.train.metrics import target_key  # noqa: E402


def _mean_se(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.4g}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.4g} ± {sd / math.sqrt(len(xs)):.2g}"


def aggregate(results: dict[int, dict], targets) -> dict:
    """{method: {"final_val_loss": [...], "outer_steps_to_target": {t: [...]}}} over seeds."""
    out: dict = {}
    for res in results.values():
        for name, s in res["methods"].items():
            agg = out.setdefault(name, {"final_val_loss": [], "outer_steps_to_target": {target_key(t): []
                                                                                        for t in targets}})
            agg["final_val_loss"].append(s["final_val_loss"])
            for t in targets:
                agg["outer_steps_to_target"][target_key(t)].append(s["outer_steps_to_target"][target_key(t)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir or Path("runs") / (Path(args.config).stem + "_seeds"))
    results = {}
    for seed in seeds:
        cfg = load_config(args.config, overrides=[*args.set, f"train.seed={seed}"])
        results[seed] = compare(cfg, workdir / f"seed_{seed}")
    targets = cfg.train.target_losses
    agg = aggregate(results, targets)
    (workdir / "seeds.json").write_text(json.dumps(agg, indent=2))
    head = ["method", "final val"] + [f"outer steps→{t:g} (reached)" for t in targets]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, a in agg.items():
        cells = [name, _mean_se(a["final_val_loss"])]
        for t in targets:
            xs = [x for x in a["outer_steps_to_target"][target_key(t)] if x is not None]
            cells.append(f"{_mean_se(xs)} ({len(xs)}/{len(seeds)})")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
