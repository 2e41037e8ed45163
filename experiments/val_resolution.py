"""How finely a validation set resolves the differences a study reports.

For each finished run directory (holding config.yaml and final_params/), the per-sequence mean
loss of the final parameters on the run's validation set is computed (and cached as
val_per_sequence.npy in the run directory). Then, per batch size, for every pair of methods at
their best learning rate (chosen by mean final validation loss, as `gn analyze --fixed-tokens`),
runs are paired by seed and the difference of their validation losses gets its paired standard
error over the *same* sequences:

    se_paired = sd_i(ℓ_a,i − ℓ_b,i) / sqrt(n_val),

beside the unpaired s.e. of one mean, sd_i(ℓ_i)/sqrt(n_val). A reported gap smaller than about
two paired standard errors is not resolved by this validation set (whatever the seeds say).
Runs stopped at a target end at about the same loss, so there the paired s.e. says how finely the
set resolves "reached the target" — the size of a crossing's reading noise.

    python experiments/val_resolution.py runs/large_batch_v2 --out experiments/results/large_batch_v2/val_resolution.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import jax
import numpy as np

from gn import data as gn_data
from gn.config import config_from_dict
from gn.curvature.losses import mean_loss
from gn.curvature.objective import split_batch
from gn.model import init_params, make_apply
from gn.train.run import warm_start


def per_sequence_losses(run_dir: Path) -> np.ndarray:
    """Mean token loss of each validation sequence at the run's final parameters (cached)."""
    cache = run_dir / "val_per_sequence.npy"
    if cache.is_file():
        return np.load(cache)
    import yaml

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    source = gn_data.build_source(cfg.data, seed=cfg.train.seed)
    model_cfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=source.vocab_size)
    apply_fn = make_apply(model_cfg)
    params = warm_start(str(run_dir), init_params(model_cfg, jax.random.PRNGKey(0)))
    val = source.validation(cfg.train.eval_batch_size)

    @jax.jit
    def losses(p, batch):
        x, y = split_batch(batch)
        return jax.vmap(lambda xi, yi: mean_loss(apply_fn(p, xi[None]), yi[None]))(x, y)

    out = np.concatenate([np.asarray(losses(params, b)) for b in val])
    np.save(cache, out)
    return out


def _runs(root: Path) -> list[dict]:
    out = []
    for s in sorted(root.rglob("summary.json")):
        d = s.parent
        if not (d / "final_params").is_dir():
            continue
        info = json.loads((d / "sweep_run.json").read_text()) if (d / "sweep_run.json").is_file() else {}
        summ = json.loads(s.read_text())
        out.append({"dir": d, "method": info.get("method", summ.get("method")), "batch_size": info.get("batch_size"),
                    "learning_rate": info.get("learning_rate"), "seed": info.get("seed"),
                    "final": summ.get("final_val_loss")})
    return out


def resolution(roots: list[Path]) -> dict:
    runs = [r for root in roots for r in _runs(root)]
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by[(r["method"], r["batch_size"])][r["learning_rate"]].append(r)
    best = {}
    for key, per_lr in by.items():
        lr = min(per_lr, key=lambda lr: np.mean([r["final"] for r in per_lr[lr]]))
        best[key] = {r["seed"]: r for r in per_lr[lr]}
    result = {"pairs": [], "sets": {}}
    for (m, B), seeds in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for r in seeds.values():
            r["losses"] = per_sequence_losses(r["dir"])
        x = next(iter(seeds.values()))["losses"]
        result["sets"][f"{m}@{B}"] = {"n_val": int(x.size), "per_sequence_sd": float(x.std(ddof=1)),
                                      "se_of_mean": float(x.std(ddof=1) / math.sqrt(x.size))}
    methods_at = defaultdict(list)
    for (m, B) in best:
        methods_at[B].append(m)
    for B, ms in sorted(methods_at.items()):
        for a, b in combinations(sorted(ms), 2):
            common = sorted(set(best[(a, B)]) & set(best[(b, B)]))
            for seed in common:
                la, lb = best[(a, B)][seed]["losses"], best[(b, B)][seed]["losses"]
                d = la - lb
                result["pairs"].append({"batch_size": B, "a": a, "b": b, "seed": seed, "n_val": int(d.size),
                                        "diff": float(d.mean()), "se_paired": float(d.std(ddof=1) / math.sqrt(d.size)),
                                        "se_unpaired": float(math.sqrt(la.var(ddof=1) / la.size
                                                                       + lb.var(ddof=1) / lb.size))})
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = resolution([Path(d) for d in args.dirs])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    for p in res["pairs"]:
        print(f"B={p['batch_size']} {p['a']} - {p['b']} (seed {p['seed']}): {p['diff']:+.4f} "
              f"± {p['se_paired']:.4f} paired (± {p['se_unpaired']:.4f} unpaired), n = {p['n_val']}")


if __name__ == "__main__":
    main()
