"""Pure optax transformations and aliases: import these without the trainer.

Every public optimizer of the toolkit is an optax `GradientTransformation`
(`init`, `update`), composable with `optax.chain`:

- Muon family: `muon` (optax.contrib.muon, path-routed), `normuon`, `rmsuon`, `adarmsuon`.
- `soap` / `scale_by_soap` (Vyas et al. 2024).
- K-FAC: `scale_by_kfac`, `kfac`; FOG / DiagFog / PI-Muon (docs/methods.md §1-3): `fog`, `diagfog`, `pi_muon`,
  `scale_by_fog`, `scale_by_diagfog`, `scale_by_diag_fisher`, `scale_by_pi_muon`, `scale_by_muon`.
- Layerwise Gauss-Newton as a g_fisher backend (docs/methods.md §4): `layerwise_gn_direction`,
  `scale_by_layerwise_gn`, `lwgn`, `fog_gn`, and PI-Muon over it, `pi_muon_gn`.
- Building blocks: `decoupled_weight_decay`, `clip_and_decay`, path masks (`decay_mask`,
  `matrix_mask`), schedules (`make_schedule`).

They import `gn.curvature` at most: no registry, no trainer, no model. The
trainer-facing methods built from them live in `gn.methods`.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from gn.optim._fog import (DIAG_MODES, FISHER_SOURCES, diagfog, fog, kfac, matrix_mask_fn, pi_muon,
                          predictive_integrity, scale_by_diag_fisher, scale_by_diagfog, scale_by_fog, scale_by_muon,
                          scale_by_pi_muon, with_adamw_side, with_fisher_direction)
from gn.optim._kfac import DAMPING_MODES, FISHER_TYPES, batch_factors, scale_by_kfac, stat_layers
from gn.optim._kfac import Path as ParamPath
from gn.optim._lwgn import fog_gn, kernels_only, layerwise_gn_direction, lwgn, scale_by_layerwise_gn
from gn.optim.masks import decay_mask, matrix_mask
from gn.optim.muon_family import adarmsuon, normuon, rmsuon
from gn.optim.schedules import make_schedule
from gn.optim._soap import scale_by_soap, soap
from gn.optim.transforms import clip_and_decay, decoupled_weight_decay, muon, tree_norm


def pi_muon_gn(learning_rate: optax.ScalarOrSchedule, apply_fn: Callable, *, damping: float = 1e-3,
               max_iters: int = 5, include_head: bool = False, **kwargs: Any) -> optax.GradientTransformation:
    """PI-Muon with layerwise Gauss-Newton as g_fisher (docs/methods.md §4):
    u = (1 − λ) (G_bb + λI)⁻¹ g + λ Muon(g) on the hidden kernels, AdamW elsewhere.

    Extra args of `update`: `entropy=`, `inputs=`, `targets=` (the gradient's batch).
    """
    fisher = scale_by_layerwise_gn(apply_fn, damping=damping, only=kernels_only(include_head), max_iters=max_iters,
                                   block_mode="unrolled")
    return pi_muon(learning_rate, fisher=fisher, damping=damping, include_head=include_head, **kwargs)


__all__ = [
    "DAMPING_MODES", "DIAG_MODES", "FISHER_SOURCES", "FISHER_TYPES", "ParamPath", "batch_factors", "kernels_only",
    "predictive_integrity", "stat_layers",
    "adarmsuon", "clip_and_decay", "decay_mask", "decoupled_weight_decay", "diagfog", "fog", "fog_gn", "kfac",
    "layerwise_gn_direction", "lwgn", "make_schedule", "matrix_mask", "matrix_mask_fn", "muon", "normuon",
    "pi_muon", "pi_muon_gn", "rmsuon", "scale_by_diag_fisher", "scale_by_diagfog", "scale_by_fog",
    "scale_by_kfac", "scale_by_layerwise_gn", "scale_by_muon", "scale_by_pi_muon", "scale_by_soap", "soap",
    "tree_norm", "with_adamw_side", "with_fisher_direction",
]
