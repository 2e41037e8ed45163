"""Studies over finished runs: analyses that read run directories or tables and
never train. `gn.studies.cbs` holds the numerics of the critical-batch-size
analysis (pure numpy), `gn.studies.analyze` the `gn analyze` driver.

Nothing is imported here so that `import gn.studies.cbs` stays light.
"""
