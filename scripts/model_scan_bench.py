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


def _loss(apply):
    return lambda p, toks: curvature.mean_loss(apply(p, toks[:, :-1]), toks[:, 1:])


def compile_table(widths, layers, batch, seq):
    print(f"jit(value_and_grad(mean CE)) compile time, batch {batch} x seq {seq}; "
          "lower = trace + lower, xla = XLA compile (seconds)")
    print(f"{'widths':>6} {'layers':>6} | {'unrolled lower':>14} {'xla':>7} | {'scan lower':>10} {'xla':>7}")
    for w in widths:
        spec = dict(WIDTHS[w])
        for n in layers:
            row = []
            for scan in (False, True):
                cfg = model_config(spec["preset"], **{k: v for k, v in spec.items() if k != "preset"},
                                   layers=n, scan_layers=scan)
                params, toks = _abstract(cfg, batch, seq)
                lower_s, xla_s, _ = _compile(jax.value_and_grad(_loss(make_apply(cfg))), params, toks)
                row += [lower_s, xla_s]
                jax.clear_caches()
            print(f"{w:>6} {n:>6} | {row[0]:>14.2f} {row[1]:>7.2f} | {row[2]:>10.2f} {row[3]:>7.2f}", flush=True)


def memory_table(batch, seq, layerwise, logits_chunk, scans):
    gib = 2 ** 30
    print(f"45m preset, batch {batch} x seq {seq}, logits_chunk {logits_chunk}: XLA temp GiB "
          "(memory_analysis().temp_size_in_bytes), compile s")
    fns = ["value_and_grad", "gn_quadratic"] + (["gn_layerwise_quadratic"] if layerwise else [])
    print(f"{'scan':>5} {'remat':>5} | " + " | ".join(f"{f:>22}" for f in fns))
    for scan in scans:
        for remat in (False, True):
            cfg = model_config("45m", remat=remat, scan_layers=scan, logits_chunk=logits_chunk)
            apply = make_apply(cfg)
            params, toks = _abstract(cfg, batch, seq)
            cells = []
            for f in fns:
                if f == "value_and_grad":
                    fn, args = jax.value_and_grad(_loss(apply)), (params, toks)
                else:
                    part = "transformer_blocks" if f == "gn_layerwise_quadratic" else None

                    def fn(p0, p, t, part=part):
                        return curvature.quadratic_model(apply, p0, t[:, :-1], t[:, 1:], partition=part)(p)
                    args = (params, params, toks)
                _, xla_s, temp = _compile(fn, *args)
                cells.append(f"{temp / gib:>8.2f} GiB ({xla_s:>5.1f} s)")
                jax.clear_caches()
            print(f"{str(scan):>5} {str(remat):>5} | " + " | ".join(f"{c:>22}" for c in cells), flush=True)


def init_time(preset):
    cfg = model_config(preset)
    for i in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(i)))
        print(f"init_params({preset}) call {i + 1}: {time.perf_counter() - t0:.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "memory", "init"))
    ap.add_argument("--widths", default="nano,45m")
    ap.add_argument("--layers", default="2,4,8,16")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--layerwise", action="store_true")
    ap.add_argument("--logits-chunk", type=int, default=0)
    ap.add_argument("--scan", default="false,true", help="scan settings for `memory`")
    ap.add_argument("--preset", default="150m")
    a = ap.parse_args()
    if a.what == "compile":
        compile_table(a.widths.split(","), [int(n) for n in a.layers.split(",")], a.batch or 2, a.seq or 128)
    elif a.what == "memory":
        memory_table(a.batch or 32, a.seq or 1024, a.layerwise, a.logits_chunk,
                     [s == "true" for s in a.scan.split(",")])
    else:
        init_time(a.preset)


if __name__ == "__main__":
    main()
