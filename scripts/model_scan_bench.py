"""Compile time vs depth with `scan_layers` off/on, and XLA temp memory with `remat` off/on.

    PYTHONPATH=. python scripts/model_scan_bench.py compile [--widths nano,45m] [--layers 2,4,8,16]
    PYTHONPATH=. python scripts/model_scan_bench.py memory [--batch 32 --seq 1024] [--layerwise]
    PYTHONPATH=. python scripts/model_scan_bench.py init [--preset 150m]

Compile-only (abstract `jax.ShapeDtypeStruct` inputs; nothing is executed), so it
runs on CPU at any size. `compile`: seconds to trace+lower and to XLA-compile
`jax.jit(jax.value_and_grad(mean cross-entropy))`. `memory`: `memory_analysis()`
temp bytes of value_and_grad and of one GN quadratic-model (value, grad) call
(`gn.curvature.quadratic_model` built inside the jitted function, as a GN step does)
at the `45m` preset, logits unchunked unless `--logits-chunk` is given.
`init`: wall time of `init_params` (first call, with compilation; second call).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from gn import curvature
from gn.model import init_params, make_apply, model_config

WIDTHS = {
    "nano": dict(preset="nano", vocab_size=512),
    "45m": dict(preset="45m"),
}


def _abstract(cfg, batch, seq):
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return params, jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)


def _compile(fn, *args):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, compiled.memory_analysis().temp_size_in_bytes


def _inputs_targets(toks, hidden=None):
    # Next-token targets; with `hidden` (the body alone), zeros of the hidden state's shape.
    x = toks[:, :-1]
    return x, (toks[:, 1:] if hidden is None else jnp.zeros((*x.shape, hidden), jnp.float32))


def _loss(apply, hidden=None):
    loss = "cross_entropy" if hidden is None else "mse"

    def f(p, toks):
        x, y = _inputs_targets(toks, hidden)
        return curvature.mean_loss(apply(p, x), y, loss=loss)
    return f


def compile_table(widths, layers, batch, seq, repeats=1):
    print(f"jit(value_and_grad(mean CE)) compile time, batch {batch} x seq {seq}; "
          f"lower = trace + lower, xla = XLA compile (seconds, min of {repeats})")
    print(f"{'widths':>6} {'layers':>6} | {'unrolled lower':>14} {'xla':>7} | {'scan lower':>10} {'xla':>7}")
    for w in widths:
        spec = dict(WIDTHS[w])
        for n in layers:
            row = []
            for scan in (False, True):
                cfg = model_config(spec["preset"], **{k: v for k, v in spec.items() if k != "preset"},
                                   layers=n, scan_layers=scan)
                params, toks = _abstract(cfg, batch, seq)
                best = (float("inf"), float("inf"))
                for _ in range(repeats):   # the minimum over repeats: the machine is shared
                    lower_s, xla_s, _ = _compile(jax.value_and_grad(_loss(make_apply(cfg))), params, toks)
                    best = min(best, (lower_s, xla_s), key=sum)
                    jax.clear_caches()
                row += list(best)
            print(f"{w:>6} {n:>6} | {row[0]:>14.2f} {row[1]:>7.2f} | {row[2]:>10.2f} {row[3]:>7.2f}", flush=True)


def memory_table(batch, seq, layerwise, logits_chunk, scans, body):
    gib = 2 ** 30
    what = ("the body only (up to the final norm; MSE to zero on the (B, T, D) hidden state "
            "instead of the head and cross-entropy)" if body else f"logits_chunk {logits_chunk}")
    print(f"45m preset, batch {batch} x seq {seq}, {what}: XLA temp GiB "
          "(memory_analysis().temp_size_in_bytes), compile s")
    fns = ["value_and_grad", "gn_quadratic"] + (["gn_layerwise_quadratic"] if layerwise else [])
    print(f"{'scan':>5} {'remat':>5} | " + " | ".join(f"{f:>22}" for f in fns))
    for scan in scans:
        for remat in (False, True):
            cfg = model_config("45m", remat=remat, scan_layers=scan, logits_chunk=1 if body else logits_chunk)
            apply, hidden = make_apply(cfg), None
            params, toks = _abstract(cfg, batch, seq)
            if body:
                # The blocks' share alone: the body's output against zeros, no head.
                apply, hidden = apply.body, cfg.hidden
            loss = "cross_entropy" if hidden is None else "mse"
            cells = []
            for f in fns:
                if f == "value_and_grad":
                    fn, args = jax.value_and_grad(_loss(apply, hidden)), (params, toks)
                else:
                    part = "transformer_blocks" if f == "gn_layerwise_quadratic" else None

                    def fn(p0, p, t, part=part, apply=apply, hidden=hidden, loss=loss):
                        x, y = _inputs_targets(t, hidden)
                        return curvature.quadratic_model(apply, p0, x, y, partition=part, loss=loss)(p)
                    args = (params, params, toks)
                _, xla_s, temp = _compile(fn, *args)
                cells.append(f"{temp / gib:>8.2f} GiB ({xla_s:>5.1f} s)")
                jax.clear_caches()
            print(f"{str(scan):>5} {str(remat):>5} | " + " | ".join(f"{c:>22}" for c in cells), flush=True)


def init_time(preset, layers):
    """init_params wall time (first call with compilation, second call), and XLA
    compile time of the single-draw program vs the per-leaf-shape programs."""
    from gn.model import init as model_init
    from gn.model.llama import Llama

    cfg = model_config(preset)
    for i in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(i)))
        print(f"init_params({preset}) call {i + 1}: {time.perf_counter() - t0:.2f} s", flush=True)
    key = jax.random.PRNGKey(0)
    for n in layers:
        c = model_config(preset, layers=n)
        shapes = jax.eval_shape(Llama(c).init, key, jnp.zeros((1, 1), jnp.int32))["params"]
        specs = tuple((p[-1].key, tuple(leaf.shape)) for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0])
        jax.clear_caches()
        t0 = time.perf_counter()
        model_init._draw_all_at_once.lower(key, specs, c.dtype).compile()
        single = time.perf_counter() - t0
        distinct = sorted({(name, shape) for name, shape in specs if name not in model_init.CONSTANT_LEAVES})
        t0 = time.perf_counter()
        for name, shape in distinct:
            model_init._draw_slice.lower(key, jnp.zeros(2, jnp.uint32), shape, c.dtype, name).compile()
        sliced = time.perf_counter() - t0
        print(f"{preset} layers {n}: compile single draw {single:.2f} s; per-leaf-shape draws "
              f"({len(distinct)} programs) {sliced:.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "memory", "init"))
    ap.add_argument("--widths", default="nano,45m")
    ap.add_argument("--layers", default="2,4,8,16", help="depths for `compile` (and `init`)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--layerwise", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="`compile`: report the fastest of this many")
    ap.add_argument("--logits-chunk", type=int, default=0)
    ap.add_argument("--scan", default="false,true", help="scan settings for `memory`")
    ap.add_argument("--preset", default="150m")
    ap.add_argument("--body", action="store_true", help="`memory` of the body alone (no head, no logits)")
    a = ap.parse_args()
    if a.what == "compile":
        compile_table(a.widths.split(","), [int(n) for n in a.layers.split(",")], a.batch or 2, a.seq or 128, a.repeats)
    elif a.what == "memory":
        memory_table(a.batch or 32, a.seq or 1024, a.layerwise, a.logits_chunk,
                     [s == "true" for s in a.scan.split(",")], a.body)
    else:
        init_time(a.preset, [int(n) for n in a.layers.split(",")])


if __name__ == "__main__":
    main()
