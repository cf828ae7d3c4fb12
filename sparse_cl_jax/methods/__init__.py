"""Continual-learning methods, selected by name (``config.method``)."""

from __future__ import annotations

import importlib

from sparse_cl_jax.methods import base

# name -> module in this package with a make(config, ctx) -> base.Method function.
REGISTRY = {
    "finetune": "finetune",
    "packnet": "packnet",
    "individual": "individual",  # one model per task (CPG's reference)
    "piggyback": "piggyback",
    "cpg": "cpg",
    "pae": "cpg",  # CPG without picking, growth up to 2x (same module)
    "dst": "dst",
    "clnp": "clnp",
    "llt": "llt",  # Lifelong Lottery Tickets: class-IL TD/BU tickets with lottery teaching
    "prac": "prac",  # PrAC lottery tickets and its IMP baselines (single task)
}


def module(name: str):
  """The module implementing method ``name``."""
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(REGISTRY)}")
  return importlib.import_module(f"sparse_cl_jax.methods.{REGISTRY[name]}")


def default_norm(name: str) -> str:
  """The normalisation method ``name`` wants for models that have one (``norm="auto"``)."""
  return getattr(module(name), "DEFAULT_NORM", "batch")


def make(name: str, config, ctx: base.Context) -> base.Method:
  """Builds the method called ``name``."""
  return module(name).make(config, ctx)
