"""Registers the built-in methods. Imported once by the registry."""

from __future__ import annotations

from gn.optim import first_order
from gn.optim.gauss_newton import register_gauss_newton
from gn.optim.registry import MethodSpec, register


def _register_first_order() -> None:
    for name, (description, factory) in first_order.FACTORIES.items():
        def build(display, hparams, ctx, _name=name, _factory=factory):
            return first_order.build_optax_method(display, _name, hparams, ctx, _factory)

        register(MethodSpec(name=name, description=description, hparams_cls=first_order.OptimHParams,
                            options=factory.options, defaults=first_order.DEFAULTS.get(name, {}),
                            build=build, family="curvature" if factory.needs_batch else "first_order"))


_register_first_order()
register_gauss_newton()


def _register_fog_family() -> None:
    from gn.optim import fog

    fog.register_fog_family()
    base = fog.FAMILY["pi_muon"]
    register(MethodSpec(
        name="pi_muon_gn",
        description="PI-Muon with layerwise Gauss-Newton as g_fisher: (1-λ)(G_bb+λI)⁻¹g + λ Muon(g) (seed 004)",
        hparams_cls=first_order.OptimHParams, options={**base[1], "fisher_source": "lwgn", "lwgn_iters": 5},
        defaults=base[2],
        build=lambda display, hparams, ctx: fog.build_method("pi_muon", display, hparams, ctx), family="fog"))


_register_fog_family()
