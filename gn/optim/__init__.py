"""Pure optax transformations and aliases: import these without the trainer.

Every public optimizer of the toolkit is an optax `GradientTransformation`
(`init`, `update`), composable with `optax.chain`:

- One Muon core, `scale_by_muon` (momentum → Newton–Schulz → width scaling; its pieces
  `muon_momentum`, `orthogonalize`, `muon_scale` / `scale_width`), and one AdamW-side router,
  `with_adamw_side` (hidden 2-D kernels, plus lm_head with include_head, on the matrix side;
  embedding, head, norms, biases on AdamW; defaults `ADAMW_SIDE`), used by every alias below.
- Muon family: `muon` (the numbers of optax.contrib.muon), `normuon`, `rmsuon`, `adarmsuon`.
- `soap` / `scale_by_soap` (Vyas et al. 2024).
- K-FAC: `scale_by_kfac`, `kfac`; FOG / DiagFog / PI-Muon (docs/methods.md §1-3): `fog`, `diagfog`, `pi_muon`,
  `scale_by_fog`, `scale_by_diagfog`, `scale_by_diag_fisher`, `scale_by_pi_muon`.
- Layerwise Gauss-Newton as a g_fisher backend (docs/methods.md §4): `layerwise_gn_direction`,
  `scale_by_layerwise_gn`, `lwgn`, `fog_gn`, and PI-Muon over it, `pi_muon_gn`.
- Building blocks: `decoupled_weight_decay`, `clip_and_decay`, `clip_by_group_norm`,
  `embed_head_split` / `embed_head_labels` (the paper's inner-optimizer split), path masks
  (`decay_mask`, `matrix_mask`, `matrix_mask_fn`, `validate_decay_rule`), schedules
  (`make_schedule`, `SCHEDULES`; `Schedule`, whose scalars can be arguments of a compiled step: `collecting_schedules`, `bound_schedules`), `tree_norm`, `safe_increment`.

They import `gn.curvature` at most: no registry, no trainer, no model. The
trainer-facing methods built from them live in `gn.methods`.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from gn.optim._fog import (DIAG_MODES, FISHER_SOURCES, diagfog, fog, kfac, pi_muon, predictive_integrity,
                          scale_by_diag_fisher, scale_by_diagfog, scale_by_fog, scale_by_pi_muon,
                          with_fisher_direction)
from gn.optim._kfac import DAMPING_MODES, FISHER_TYPES, batch_factors, kron_stats_cost, scale_by_kfac, stat_layers
from gn.optim._kfac import Path as ParamPath
from gn.optim._lwgn import (fog_gn, kernels_only, layerwise_gn_cost, layerwise_gn_direction, lwgn,
                            scale_by_layerwise_gn)
from gn.optim._muon import (ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_NESTEROV, ADAM_WEIGHT_DECAY, ADAMW_SIDE,
                            matrix_mask_fn, muon, muon_momentum, scale_by_muon, with_adamw_side)
from gn.optim.masks import DECAY_RULES, decay_mask, matrix_mask, validate_decay_rule
from gn.optim.muon_family import adarmsuon, normuon, rmsuon, scale_by_normuon, scale_by_rmsuon
from gn.optim.newton_schulz import (DEFAULT_NS_COEFFS, NS_BACKENDS, muon_scale, orthogonalize, safe_increment,
                                    scale_width)
from gn.optim.schedules import SCHEDULES, Schedule, make_schedule
from gn.optim.schedules import bound as bound_schedules, collecting as collecting_schedules
from gn.optim._soap import scale_by_soap, soap
from gn.optim.transforms import (clip_and_decay, clip_by_group_norm, decoupled_weight_decay, embed_head_labels,
                                 embed_head_split, tree_norm)


def pi_muon_gn(learning_rate: optax.ScalarOrSchedule, apply_fn: Callable, *, damping: float = 1e-3,
               max_iters: int = 5, include_head: bool = False, curvature_batch: int = 0,
               **kwargs: Any) -> optax.GradientTransformation:
    """PI-Muon with layerwise Gauss-Newton as g_fisher (docs/methods.md §4):
    u = (1 − λ) (G_bb + λI)⁻¹ g + λ Muon(g) on the hidden kernels, AdamW elsewhere.

    Extra args of `update`: `entropy=`, `inputs=`, `targets=` (the gradient's batch).
    """
    fisher = scale_by_layerwise_gn(apply_fn, damping=damping, only=kernels_only(include_head), max_iters=max_iters,
                                   block_mode="unrolled", curvature_batch=curvature_batch)
    return pi_muon(learning_rate, fisher=fisher, damping=damping, include_head=include_head, **kwargs)


__all__ = [
    "ADAMW_SIDE", "ADAM_B1", "ADAM_B2", "ADAM_EPS", "ADAM_NESTEROV", "ADAM_WEIGHT_DECAY", "DAMPING_MODES",
    "DECAY_RULES", "DEFAULT_NS_COEFFS", "DIAG_MODES", "FISHER_SOURCES", "FISHER_TYPES", "NS_BACKENDS", "ParamPath",
    "SCHEDULES", "batch_factors", "kernels_only", "kron_stats_cost", "predictive_integrity", "stat_layers",
    "adarmsuon", "clip_and_decay", "clip_by_group_norm", "decay_mask", "decoupled_weight_decay", "diagfog",
    "embed_head_labels", "embed_head_split", "fog", "fog_gn", "kfac", "layerwise_gn_cost", "layerwise_gn_direction", "lwgn",
    "make_schedule", "Schedule", "bound_schedules", "collecting_schedules", "matrix_mask", "matrix_mask_fn", "muon", "muon_momentum", "muon_scale", "normuon",
    "orthogonalize", "pi_muon", "pi_muon_gn", "rmsuon", "safe_increment", "scale_by_diag_fisher",
    "scale_by_diagfog", "scale_by_fog", "scale_by_kfac", "scale_by_layerwise_gn", "scale_by_muon",
    "scale_by_normuon", "scale_by_pi_muon", "scale_by_rmsuon", "scale_by_soap", "scale_width", "soap", "tree_norm",
    "validate_decay_rule", "with_adamw_side", "with_fisher_direction",
]
