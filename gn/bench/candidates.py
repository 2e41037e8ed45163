"""`gn bench candidates`: the candidates for a faster GN inner step, each one option apart.

Every candidate is the plain float32 model with one change (or the one combination named):
bf16 matmuls (`compute_dtype`), chunked logits (`logits_chunk`), chunked attention
(`attn_chunk`), block recomputation (`remat`), the layer scan (`scan_layers`), bf16 with
chunked logits only, and the whole lean setting with bf16 (what the paper presets ran before
`model.memory`). For each, in one process, interleaved round-robin, medians:

- `step_s`: one GN inner step (`inner_step_fn`: the local model at θ_t, its value and gradient
  at θ̂, the inner Muon update), its ratio to the plain float32 step, and XLA's temp bytes;
- `numbers`: that candidate's ℓ(z0), q(θ̂) and ∇q(θ̂) against its own precision's plain
  model on the same θ_t, θ̂ and batch (`value_rel`, `grad_rel` = ‖∇q − ∇q_ref‖ / ‖∇q_ref‖):
  the memory and speed options must compute the same numbers up to summation order, and bf16
  is compared with bf16 plain (its distance from float32 is the `bf16` row against `plain`).

The chunk sizes are the presets' (4096 tokens, 256 queries) unless the shapes are smaller,
then a quarter of the tokens and half the sequence (so that a tiny run still chunks).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gn.bench.gn_step import GNBenchConfig, _build, inner_step_fn
from gn.bench.harness import compile_aot, machine_info, model_for_bench, random_tokens, time_round_robin


def candidate_overrides(batch: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """name -> ModelConfig fields; `plain` first (the reference of the float32 candidates),
    `bf16` the reference of the bf16 ones."""
    lc = 4096 if batch * seq_len > 4096 else max(1, batch * seq_len // 4)
    ac = 256 if seq_len > 256 and seq_len % 256 == 0 else max(1, seq_len // 2)
    bf16 = {"compute_dtype": "bfloat16"}
    return {
        "plain": {},
        "bf16": bf16,
        "logits_chunk": {"logits_chunk": lc},
        "attn_chunk": {"attn_chunk": ac},
        "remat": {"remat": True},
        "scan_layers": {"scan_layers": True},
        "bf16_logits_chunk": {**bf16, "logits_chunk": lc},
        "bf16_lean": {**bf16, "logits_chunk": lc, "attn_chunk": ac, "remat": True, "scan_layers": True},
    }


def _reference(name: str, ov: dict) -> str:
    return "bf16" if ov.get("compute_dtype") == "bfloat16" and name != "bf16" else "plain"


def run_candidates(cfg: GNBenchConfig = GNBenchConfig(), *, only: tuple[str, ...] | None = None,
                   timed: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Time and check every candidate (or those in `only`); see the module docstring.
    `timed=False` checks the numbers only (no inner step compiled or timed: step_s None)."""
    from gn.methods.base import MethodContext
    from gn.model import init_params, make_apply

    cfg.validate()
    say = log or (lambda msg: None)
    b, T = cfg.inner_batch, cfg.seq_len
    cands = candidate_overrides(b, T)
    if only:
        unknown = sorted(set(only) - set(cands))
        if unknown:
            from gn.errors import ConfigError
            raise ConfigError(f"bench candidates: unknown candidate(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(cands)}.")
        keep = set(only) | {_reference(n, cands[n]) for n in only} | {"plain"}
        cands = {k: v for k, v in cands.items() if k in keep}
    base = {**dict(cfg.model_overrides), "memory": None}
    mcfg0 = model_for_bench(cfg.preset, cfg.vocab_size, {**base, "logits_chunk": 0, "attn_chunk": 0,
                                                          "remat": False, "scan_layers": False}, T)
    params = init_params(mcfg0, jax.random.PRNGKey(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    batch = random_tokens(rng, (b, T + 1), mcfg0.vocab_size)
    theta_hat = jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + 1e-2 * rng.standard_normal(p.shape).astype(p.dtype)), params)
    step0, i0 = jnp.zeros((), jnp.int32), jnp.asarray(1, jnp.int32)
    hp = {"inner_steps": cfg.inner_steps, **({"inner_optimizer": cfg.inner_optimizer} if cfg.inner_optimizer else {})}

    fns, compiled, outputs, configs = {}, {}, {}, {}
    for name, ov in cands.items():
        mcfg = dataclasses.replace(mcfg0, **ov)
        mcfg.validate()
        apply = make_apply(mcfg)
        gn = _build("gn", hp, MethodContext(apply_fn=apply, total_steps=100, batch_size=cfg.inner_steps * b,
                                            model_cfg=mcfg, reference_batch_size=cfg.inner_steps * b))
        configs[name] = ov
        compiled[name] = {}
        if timed:
            opt = gn.init(params).inner_opt
            say(f"compiling candidate {name}")
            exe, compiled[name] = compile_aot(jax.jit(inner_step_fn(gn)), params, theta_hat, opt, batch, step0, i0,
                                              compiler_options=cfg.compiler_options)
            fns[name] = (lambda exe=exe, opt=opt: exe(params, theta_hat, opt, batch, step0, i0))
        model_grad = jax.jit(lambda th0, th, bt, gn=gn: gn.local_model(th0, bt).with_loss0(th))
        value, grads, loss0 = model_grad(params, theta_hat, batch)
        outputs[name] = (float(value), float(loss0), grads)
    med: dict[str, float | None] = dict.fromkeys(configs)
    if timed:
        say(f"timing {len(fns)} candidates x {cfg.repeats} rounds")
        samples = time_round_robin(fns, cfg.repeats, warmup=1)
        med = {k: statistics.median(v) for k, v in samples.items()}

    def rel_grad(a, ref):
        num = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(ref)))
        den = sum(float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in jax.tree.leaves(ref))
        return (num / den) ** 0.5 if den else 0.0

    rows = {}
    for name, ov in configs.items():
        ref = _reference(name, ov)
        v, l0, g = outputs[name]
        rv, rl0, rg = outputs[ref]
        rows[name] = {"overrides": ov, "reference": ref, "step_s": med[name],
                      "over_plain": med[name] / med["plain"] if timed else None, "temp_bytes": compiled[name].get("temp_bytes"),
                      "compile_s": compiled[name].get("compile_s"),
                      "value": v, "loss0": l0,
                      "value_rel": abs(v - rv) / max(abs(rv), 1e-30), "loss0_rel": abs(l0 - rl0) / max(abs(rl0), 1e-30),
                      "grad_rel": rel_grad(g, rg)}
    return {"benchmark": "gn_inner_step_candidates",
            "config": {"preset": cfg.preset, "vocab_size": mcfg0.vocab_size, "inner_batch": b, "seq_len": T,
                       "repeats": cfg.repeats, "seed": cfg.seed},
            "machine": machine_info(), "candidates": rows}


def format_candidates_table(res: dict) -> str:
    c = res["config"]
    lines = [f"gn bench candidates: {c['preset']} (vocab {c['vocab_size']}), b_inner {c['inner_batch']} x seq "
             f"{c['seq_len']}; one GN inner step, medians of {c['repeats']} interleaved rounds; "
             f"{res['machine']['backend']}",
             f"{'candidate':<20}{'step ms':>10}{'x plain':>9}{'temp MiB':>10}{'vs':>7}{'value rel':>11}"
             f"{'grad rel':>10}"]
    for name, r in res["candidates"].items():
        tb = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:,.1f}"
        ms = "-" if r["step_s"] is None else f"{1e3 * r['step_s']:.2f}"
        xp = "-" if r["over_plain"] is None else f"{r['over_plain']:.2f}"
        lines.append(f"{name:<20}{ms:>10}{xp:>9}{tb:>10}{r['reference']:>7}"
                     f"{r['value_rel']:>11.1e}{r['grad_rel']:>10.1e}")
    return "\n".join(lines)
