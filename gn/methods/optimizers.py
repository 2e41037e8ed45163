"""The first-order methods by name: what a GN inner loop or a registry may choose from."""

from __future__ import annotations

from gn.methods import first_order, muon_like

OPTIMIZERS: dict[str, type[first_order.OptimizerConfig]] = {
    c.name: c for c in (*first_order.CONFIGS, *muon_like.CONFIGS)}
