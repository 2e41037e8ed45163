"""train.compile_reuse: the learning rate an argument of the compiled step (gn.optim.schedules).

* A Schedule gives the same float32 values whether its scalars are Python constants or
  traced arguments (every schedule, with and without warmup, every step of its horizon);
  scaled by an AdamW side's ratio, within 1 ulp (XLA reassociates constant factors only).
* With compile_reuse, two learning rates lower to one program (identical HLO text), so
  the persistent cache serves the second; without it they lower to two (the test can fail).
* The numbers: XLA compiles another program (constant factors reassociated in one, not in
  the other), so a run may differ at float32 rounding
  (measured: adamw, 30 steps, largest relative difference of a validation loss 1.1e-7;
  muon and fog bit-identical); here 4 steps of adamw and fog agree to 1e-6 relative.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.config import config_from_dict
from gn.model import init_params
from gn.optim import bound_schedules, collecting_schedules, make_schedule
from gn.train.run import prepare
from gn.train.trainer import train
from tests.tiny_models import nano_run

@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_values_are_the_same_with_traced_scalars(name, warmup):
    with collecting_schedules() as made:
        sched = make_schedule(name, 3e-3, 50, warmup_steps=warmup, min_lr_ratio=0.1)
        scaled = sched.scaled(0.37)
    assert made == [sched, scaled]
    steps = jnp.arange(60)
    folded = jax.jit(jax.vmap(lambda s: jnp.stack([sched(s), scaled(s)])))(steps)

    def traced(args, s):
        with bound_schedules(made, args):
            return jnp.stack([sched(s), scaled(s)])

    argued = jax.jit(jax.vmap(traced, in_axes=(None, 0)))(tuple(m.arguments() for m in made), steps)
    # The schedules themselves: bit for bit. Scaled by a ratio, XLA folds (peak · x) · ratio into
    # x · (peak · ratio) when both are constants (its algebraic simplifier reassociates constant
    # factors), and not when they are arguments: 1 ulp apart at some warmup steps (measured).
    np.testing.assert_array_equal(np.asarray(argued[:, 0]), np.asarray(folded[:, 0]))
    np.testing.assert_allclose(np.asarray(argued[:, 1]), np.asarray(folded[:, 1]), rtol=2.4e-7, atol=0)
    assert folded.dtype == jnp.float32 and float(folded[warmup + 1, 0]) > 0


def _cfg(method: dict, reuse: bool):
    return config_from_dict(nano_run([method], steps=4, ema_decay=0.0, compile_reuse=reuse))


def _hlo(method: dict, lr: float, reuse: bool) -> str:
    cfg = _cfg({**method, "learning_rate": lr}, reuse)
    run = prepare(cfg, method["name"])
    params = init_params(run.model_cfg, jax.random.PRNGKey(0))
    state = run.method.init(params)
    batches = jnp.zeros((1, 16, 17), jnp.int32)
    key = jax.random.PRNGKey(1)
    if reuse:
        m = run.method
        return m.bound_step.lower(m.step_arguments, params, state, batches, None, key).as_text()
    return run.method.step.lower(params, state, batches, None, key).as_text()


@pytest.mark.parametrize("method", [{"name": "adamw"},
                                    {"name": "muon", "adam_learning_rate": 0.004}])
def test_two_learning_rates_lower_to_one_program_with_compile_reuse(method):
    assert _hlo(method, 0.01, True) == _hlo(method, 0.03, True)
    assert _hlo(method, 0.01, False) != _hlo(method, 0.03, False)


@pytest.mark.parametrize("method", [{"name": "adamw", "learning_rate": 0.01}, {"name": "fog"}])
def test_compile_reuse_trains_to_the_same_losses(tmp_path, method):
    rows = {}
    for reuse in (False, True):
        train(_cfg(method, reuse), method["name"], tmp_path / str(reuse))
        rows[reuse] = [json.loads(line) for line in (tmp_path / str(reuse) / "metrics.jsonl").read_text().splitlines()]
    got = np.array([r["val_loss"] for r in rows[True]])
    ref = np.array([r["val_loss"] for r in rows[False]])
    assert len(ref) == 5 and ref[-1] < ref[0] - 0.1
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
