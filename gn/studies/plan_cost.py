"""A sweep's planned cost from the methods' own accounting, before anything runs.

Every method reports `grad_evals_per_step` (gn.methods.base.Method): one step's cost in
value_and_grad equivalents at the run's batch, as the trainer counts it into grad_evals.
GN's includes its inner loop (a primal and one tangent/transpose per block, gn.methods.
gauss_newton._flop_cost), its line search and, for the CG solver, every CG product
(gn.methods.gn_cg.cost); the statistics methods' include their statistics and their
backend's solves (gn.methods.accumulate). Some of it is only known once the method has seen
the parameters (the number of blocks, the backend's cost), so a dry run builds each distinct
(method configuration, batch) once and initialises it on abstract parameters (jax.eval_shape:
nothing is allocated or compiled), then

    cost = steps × grad_evals_per_step × train.batch_size × seq_len   (gradient-token equivalents)

with the method's own steps (the small-batch control's are its updates of B / N sequences).

What a step does adaptively (the line search's extension chunks, CG's early stop) is not
known in advance; the plan takes the configured maximum of CG iterations and the line
search's grid once, as `grad_evals_per_step` does.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Mapping

from gn.errors import ConfigError


def _key(resolved: Mapping) -> str:
    """The configuration with what cannot change a step's cost (seed, learning rates, stop rule,
    warm start) removed: runs that differ only there share one build."""
    cfg = copy.deepcopy(dict(resolved))
    train = dict(cfg.get("train") or {})
    for k in ("seed", "init_from", "target_losses", "stop_reads", "stop_after_rejected"):
        train.pop(k, None)
    cfg["train"] = train
    cfg["methods"] = [{k: v for k, v in m.items() if k not in ("inner_learning_rate", "learning_rate")}
                      for m in cfg.get("methods") or []]
    return json.dumps(cfg, sort_keys=True, default=str)


def run_cost(resolved: Mapping) -> float:
    """The planned cost of the run whose resolved config is `resolved` (one method): its steps
    (the method's own, e.g. the small-batch control's updates) × grad_evals_per_step ×
    train.batch_size × seq_len. Raises ConfigError where the run cannot be built here."""
    import jax

    from gn.config import config_from_dict
    from gn.model import init_params
    from gn.train.run import prepare

    raw = copy.deepcopy(dict(resolved))
    raw["train"] = dict(raw.get("train") or {}) | {"init_from": None}   # the warm start need not exist yet
    cfg = config_from_dict(raw)
    run = prepare(cfg, cfg.methods[0].name, num_devices=1)
    params = jax.eval_shape(lambda: init_params(run.model_cfg, jax.random.PRNGKey(0)))
    jax.eval_shape(run.method.init, params)     # sets what the cost needs of the parameters
    # grad_evals are value_and_grad equivalents at train.batch_size (MethodContext.reference_batch_size)
    return run.steps * float(run.method.grad_evals_per_step) * cfg.train.batch_size * cfg.data.seq_len


def planned_costs(runs) -> tuple[dict[int, float], list[str]]:
    """{run id: planned cost} for the sweep's `runs` (gn.studies.sweep.RunPlan) and the reasons
    for any run left out (its estimate stays the rough one). Each distinct configuration (seed
    and lr aside) is built once."""
    cache: dict[str, float | None] = {}
    reasons: list[str] = []
    out: dict[int, float] = {}
    for r in runs:
        key = _key(r.config)
        if key not in cache:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cache[key] = run_cost(r.config)
            # The configs were validated by the expansion; what fails here is the plan (data not on this
            # machine, a method that cannot be built on abstract parameters): the run keeps the rough cost.
            except Exception as exc:  # noqa: BLE001
                cache[key] = None
                what = str(exc).splitlines()[0] if str(exc) else ""
                reasons.append(f"{r.method} at B = {r.batch_size}: "
                               f"{what if isinstance(exc, ConfigError) else f'{type(exc).__name__}: {what}'}")
        if cache[key] is not None:
            out[r.id] = cache[key]
    return out, reasons


__all__ = ["planned_costs", "run_cost"]
