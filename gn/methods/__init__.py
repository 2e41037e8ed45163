"""Training methods: the `Method` protocol the trainer runs, its adapters, and the registry.

- `base`: `Method`, `BatchPlan`, `MethodContext`, `MethodConfig` (typed hyperparameters).
- `optax_method`, `stats`: first-order optax chains; the FOG family's statistics pass.
- `gauss_newton`, `linesearch`: the GN outer step (inner loop, CG solve, line search).
- `first_order`, `muon_like`, `fog`: each registered method's typed hyperparameters.
- `registry`: methods by name, `resolve_entry` for a config's `methods:` entry.
"""

from gn.methods.base import BatchPlan, Method, MethodConfig, MethodContext
from gn.methods.registry import MethodEntry, describe, get, names, resolve_entry

__all__ = ["BatchPlan", "Method", "MethodConfig", "MethodContext", "MethodEntry", "describe", "get", "names",
           "resolve_entry"]
