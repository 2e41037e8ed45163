"""Optimizers and the method registry."""

from gn.optim import registry
from gn.optim.method import BatchPlan, Method, MethodContext, OptaxMethod

__all__ = ["registry", "BatchPlan", "Method", "MethodContext", "OptaxMethod"]
