"""The base optimiser a config names, and the step-decay learning rate of a training phase."""

from __future__ import annotations

import optax


def make_base_tx(config) -> optax.GradientTransformation:
  """The base optimiser from the config, with the learning rate injected as a traced value."""

  def build(learning_rate):
    if config.optimizer == "sgd":
      parts = []
      if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
      parts.append(optax.sgd(learning_rate, momentum=config.momentum or None,
                             nesterov=bool(config.nesterov)))
      return optax.chain(*parts)
    if config.optimizer == "adam":
      parts = []
      if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
      parts.append(optax.adam(learning_rate))
      return optax.chain(*parts)
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)

  return optax.inject_hyperparams(build)(learning_rate=config.learning_rate)


def lr_for_epoch(base_lr: float, epoch: int, epochs: int, milestones, decay: float) -> float:
  """Step decay: multiply by ``decay`` at each milestone (fractions of the phase's epochs)."""
  passed = sum(1 for m in milestones if epoch >= int(round(m * epochs)))
  return float(base_lr * decay ** passed)
