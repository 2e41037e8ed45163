"""Benchmarks: the cost of a Gauss-Newton inner/outer step and of every optimizer step.

- `gn.bench.gn_step.run_gn_bench`: one GN inner step (full, prox-linear, layerwise),
  the line search and a whole outer step, against one AdamW / Muon step and one
  `value_and_grad`, with the ratios the design goals are stated in.
- `gn.bench.optimizers.run_optimizer_bench`: step time and optimizer-state size of
  every registered non-Gauss-Newton method, relative to AdamW.
- `gn.bench.compile_only.run_compile_only`: every benchmarked function compiled, not
  run, with XLA's temp bytes (`gn bench --compile-only`; works on CPU).
- `gn.bench.harness`: what they share (machine facts, AOT compilation, round-robin
  timing, the model and inputs).

All times are medians of wall-clock repeats taken after compilation, interleaved
round-robin in one process so that machine noise hits every candidate alike.
The command line is `gn bench [optimizers]` (`gn.bench.cli`).

The names below are imported on first use: importing `gn.bench` (as `gn`'s
argument parser does) must not import jax before the CLI has configured it.
"""

from importlib import import_module

_LAZY = {"GNBenchConfig": "gn_step", "machine_info": "harness", "peak_memory": "harness",
         "run_gn_bench": "gn_step", "run_compile_only": "compile_only", "OptimizerBenchConfig": "optimizers", "run_optimizer_bench": "optimizers"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"gn.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'gn.bench' has no attribute '{name}'")
