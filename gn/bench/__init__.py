"""Benchmarks: the cost of a Gauss-Newton inner/outer step and of every optimizer step.

- `gn.bench.gn_step.run_gn_bench`: one GN inner step (full, prox-linear, layerwise),
  the line search and a whole outer step, against one AdamW / Muon step and one
  `value_and_grad`, with the ratios the design goals are stated in.
- `gn.bench.optimizers.run_optimizer_bench`: step time and optimizer-state size of
  every registered non-Gauss-Newton method, relative to AdamW.

All times are medians of wall-clock repeats taken after compilation, interleaved
round-robin in one process so that machine noise hits every candidate alike.
The command line is `gn bench [optimizers]` (`gn.bench.cli`).
"""

from gn.bench.gn_step import GNBenchConfig, machine_info, peak_memory, run_gn_bench
from gn.bench.optimizers import OptimizerBenchConfig, run_optimizer_bench

__all__ = ["GNBenchConfig", "OptimizerBenchConfig", "machine_info", "peak_memory", "run_gn_bench",
           "run_optimizer_bench"]
