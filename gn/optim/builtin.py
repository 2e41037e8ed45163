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
