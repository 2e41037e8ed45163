"""Optimizers and the method registry.

`optim.layerwise_gn_direction` is the layerwise Gauss-Newton g_fisher backend:
(G_bb + λI)⁻¹ g_b for every parameter block, solved matrix-free.
"""

from gn.optim import registry
from gn.optim.lwgn import layerwise_gn_direction, scale_by_layerwise_gn
from gn.optim.method import BatchPlan, Method, MethodContext, OptaxMethod

__all__ = ["registry", "BatchPlan", "Method", "MethodContext", "OptaxMethod", "layerwise_gn_direction",
           "scale_by_layerwise_gn"]
