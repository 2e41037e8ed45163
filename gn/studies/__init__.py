"""Studies: batch-size sweeps that train (`gn sweep`) and analyses that read finished runs or
tables and never train (`gn analyze`).

- `spec`, `sweep`, `runner`: the sweep spec, its expansion into runs, the manifest, the
  resumable local runner and the SLURM job array.
- `cbs`: the numerics of the critical-batch-size analysis (pure numpy); `analyze`,
  `report`, `cbs_plots`: the `gn analyze` driver, its markdown report and plots.

Nothing is imported here so that `import gn.studies.cbs` stays light.
"""
