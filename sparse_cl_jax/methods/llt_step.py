"""Lifelong Lottery Tickets' class-incremental step (Chen et al., ICLR 2021, App. A2.2).

The model has two heads on the same features (main head = the first K logits, auxiliary head =
the next K). Task 1 trains both heads on the same batches of its own data. Every later step puts
four sub-batches of ``sub = batch_size // 4`` rows through the network as one batch: ``random``
(new data and old exemplars) for the auxiliary head, ``new`` and ``old`` (class-balanced, the rest
of each static sub-batch marked invalid) for the main head, and ``unlabeled`` (pool images with
the previous model's stored logits) for lottery teaching's KD into both heads
(:func:`llt_teaching.kd_loss`). The loss is :func:`class_il_loss`. Everything here is pure and
traced inside the trainer's jitted step; :mod:`sparse_cl_jax.methods.llt` binds the settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax.methods import llt_teaching


def step_loss(fwd, params, aux, m, batch_stats, batches, task, *, forward_params, num_outputs: int,
              sub: int, seen, gamma1: float, gamma2: float, temperature: float):
  """``Method.step_loss``: task 1's two-head CE, later tasks' :func:`class_il_loss`.

  Args:
    fwd: the trainer's model application.
    params, aux, m, batch_stats: the train state's (``m`` the method state).
    batches: the gathered rows of each source (``llt.sources``): ``random`` alone for task 1.
    task: int32 (traced), 0-based.
    forward_params: the method's ``forward_params`` (the masked params the model computes with).
    num_outputs: K, one head's logits.
    sub: rows of each sub-batch (``batch_size // 4``).
    seen: int32 [T] classes seen up to each task.
    gamma1, gamma2, temperature: the loss weights and the KD temperature.

  Returns:
    ``(loss, (new_batch_stats, [loss * count, correct, count], {}))``; the accuracy counts read
    the main head on the random rows.
  """
  K = num_outputs
  fp = forward_params(params, aux, m, task, task)
  if "new" not in batches:  # task 1 (as coded train()): both heads on the same batch
    b = batches["random"]
    logits, new_bs = fwd(fp, batch_stats, b["x"], b["valid"], task)
    v = b["valid"]
    w = jnp.maximum(jnp.sum(v.astype(jnp.float32)), 1.0)
    main = jnp.sum(jnp.where(v, masked_ce(logits[:, :K], b["y"], task, seen), 0.0)) / w
    aux_l = jnp.sum(jnp.where(v, masked_ce(logits[:, K:], b["y"], task, seen), 0.0)) / w
    loss = main + aux_l
    pred_logits, y, count_rows = logits[:, :K], b["y"], v
  else:
    parts = sub_batch_valid(batches, task, sub)
    x = jnp.concatenate([batches[n]["x"] for n, _ in parts])
    valid = jnp.concatenate([v for _, v in parts])
    logits, new_bs = fwd(fp, batch_stats, x, valid, task)
    out = dict(zip([n for n, _ in parts], jnp.split(logits, len(parts))))
    loss = class_il_loss(out, batches, dict(parts), task, m["unl"]["cols"], num_outputs=K,
                         sub=sub, seen=seen, gamma1=gamma1, gamma2=gamma2,
                         temperature=temperature)
    pred_logits, y, count_rows = out["random"][:, :K], batches["random"]["y"], parts[0][1]
  return loss, (new_bs, train_stats(loss, pred_logits, y, count_rows, task, seen), {})


def sub_batch_valid(batches, task, sub: int) -> list[tuple[str, jax.Array]]:
  """(source, valid rows) of a later task's step, in the order they go through the network.

  ``new`` and ``old`` keep only their first :func:`balanced_counts` rows (the class-balanced
  main-head batch); ``random`` and ``unlabeled`` keep the rows their sources mark valid.
  """
  n_new, n_old = balanced_counts(sub, task)
  rows = jnp.arange(sub, dtype=jnp.int32)
  parts = [("random", batches["random"]["valid"]),
           ("new", batches["new"]["valid"] & (rows < n_new)),
           ("old", batches["old"]["valid"] & (rows < n_old))]
  if "unlabeled" in batches:
    parts.append(("unlabeled", batches["unlabeled"]["valid"]))
  return parts


def class_il_loss(out, batches, valid, task, cols, *, num_outputs: int, sub: int, seen,
                  gamma1: float, gamma2: float, temperature: float) -> jax.Array:
  """``aux_CE + gamma1 * KD_aux + gamma2 * (main_CE + gamma1 * KD_main)`` (``train_KD``).

  Args:
    out: each source's logits [sub, 2K] (main head = first K).
    batches: each source's rows (``'y'``; ``'logits'`` the stored teacher logits of
      ``'unlabeled'``).
    valid: each source's valid rows (:func:`sub_batch_valid`).
    task: int32 (traced), 0-based.
    cols: the teacher's class count (the KD columns).
    num_outputs, sub, seen, gamma1, gamma2, temperature: as :func:`step_loss`.

  Returns:
    The scalar loss: aux_CE the mean over the valid random rows; main_CE summed over the
    balanced rows / ``sub`` (``coef_new`` / ``coef_old`` as coded); KD 0 without unlabeled rows.
  """
  K = num_outputs
  vr = valid["random"]
  w = jnp.maximum(jnp.sum(vr.astype(jnp.float32)), 1.0)
  aux_ce = jnp.sum(jnp.where(vr, masked_ce(out["random"][:, K:], batches["random"]["y"], task,
                                           seen), 0.0)) / w
  main_ce = (jnp.sum(jnp.where(valid["new"], masked_ce(out["new"][:, :K], batches["new"]["y"],
                                                       task, seen), 0.0))
             + jnp.sum(jnp.where(valid["old"], masked_ce(out["old"][:, :K], batches["old"]["y"],
                                                         task, seen), 0.0))
             ) / sub
  kd_main = kd_aux = jnp.float32(0.0)
  if "unlabeled" in batches:
    u = batches["unlabeled"]
    kd_main = llt_teaching.kd_loss(out["unlabeled"][:, :K], u["logits"][:, :K], cols, temperature,
                                   u["valid"])
    kd_aux = llt_teaching.kd_loss(out["unlabeled"][:, K:], u["logits"][:, K:], cols, temperature,
                                  u["valid"])
  return aux_ce + gamma1 * kd_aux + gamma2 * (main_ce + gamma1 * kd_main)


def masked_ce(logits, y, task, seen):
  """Per-row cross-entropy over the classes seen up to ``task`` (class-IL)."""
  cols = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :] < seen[task]
  return optax.softmax_cross_entropy_with_integer_labels(
      jnp.where(cols, logits, jnp.finfo(jnp.float32).min), y)


def train_stats(loss, pred_logits, y, count_rows, task, seen) -> jax.Array:
  """``[loss * count, correct, count]`` of the main head's argmax over the seen classes."""
  cols = jnp.arange(pred_logits.shape[-1], dtype=jnp.int32)[None, :] < seen[task]
  pred = jnp.argmax(jnp.where(cols, pred_logits, jnp.finfo(jnp.float32).min), -1)
  n = jnp.sum(count_rows.astype(jnp.float32))
  correct = jnp.sum(jnp.where(count_rows, pred == y, False).astype(jnp.float32))
  return jnp.stack([loss * n, correct, n])


def sub_batch_sizes(batch_size: int, t: int) -> tuple[int, int, int]:
  """(sub, new rows, old rows) of the balanced main-head sub-batches at task ``t`` (0-based).

  As coded (``dataloader.setup_dataset``): ``sub = batch_size // 4``; the new-class loader draws
  ``int(sub / (1 + t))`` rows and the exemplar loader ``int(sub * t / (1 + t))``.
  """
  sub = batch_size // 4
  return sub, sub // (1 + t), (sub * t) // (1 + t)


def balanced_counts(sub: int, task):
  """:func:`sub_batch_sizes`'s new and old counts for a traced task (int32 scalars)."""
  t = jnp.asarray(task, jnp.int32)
  return jnp.int32(sub) // (1 + t), (jnp.int32(sub) * t) // (1 + t)
