"""PrAC lottery tickets (Zhang, Chen, Chen & Wang, ICML 2021): IMP on pruning-aware critical sets.

"Efficient Lottery Ticket Finding: Less Data is More" (``shared/papers/prac_lottery_tickets_icml2021
.txt``, Algorithm 1). Single-task ticket finding: iterative magnitude pruning (IMP, 20% of the
remaining weights per round, global over the conv and dense kernels, the classifier head excluded)
with rewinding, where every round after the first trains only on the *PrAC set*
(:mod:`sparse_cl_jax.methods.prac_sets`):

* critical examples for training (Sec. 3.1, Approach I): forgetting statistics (Toneva et al.
  2019) counted online on the training minibatches of the round (``after_step``): an example is
  forgotten when it goes from correctly to incorrectly classified; examples never classified
  correctly rank as the most forgettable. Rule ``zero_out`` (as coded, threshold 0) keeps examples
  forgotten more than ``threshold`` times or never learned; rule ``constant`` (as coded,
  "constent") keeps the ``int(N * (1 - data_rate) ** (r + 1))`` most forgotten;
* critical examples for pruning (Approach II), from round 1 on: examples of the whole, unaugmented
  training set on which the dense network and the current pruned network (each its best-validation
  weights of its round, evaluation mode) predict different classes.

Dynamic iterations (Sec. 3.2 i): a round on a set of ``n`` examples runs ``int(E * n / N)`` epochs
over the set only, with the learning-rate milestones scaled the same way. Early stopping (Sec. 3.2
ii, as coded): after every epoch, the mask the next prune would produce from the current weights;
its Hamming distance to the previous epoch's such mask, divided by the number of unpruned
weights, enters a queue of 5 (once a distance above ``eps`` was seen); the round stops once every
distance in the queue is below ``eps`` (0.08).

``prac.mode`` picks the system or a baseline (see ``MODES``). Every round's ticket is retrained
from its rewinding point on the full training set for the full schedule; its test accuracy at the
epoch of best validation accuracy is reported (the authors' ``main_train.py`` protocol). The whole
search runs inside the task's ``run_task`` as recorded trainer operations, so a run killed
anywhere resumes and ends identical; forgetting statistics live in the method state.

Layout, top-down: :func:`make` wires the phases; :func:`run_task` is Algorithm 1 and
:func:`run_round` one round of it: :func:`enter_round_set` (this round's training set),
:func:`search` (training on it with dynamic iterations and early-bird), :func:`prune_phase` (the
next PrAC set from this round's statistics and best model, then the prune) and
:func:`retrain_ticket` (rewind and retrain the ticket on all the data). The baselines' own pieces
follow (random subsets, random pruning, random re-initialisation, SNIP / GraSP / SynFlow scores),
then the run's fixed settings (:class:`Plan`), the method state and its jitted updates
(:class:`Ops`), the pure building blocks (pruning, dynamic schedule, early-bird) and the report.

Example::

  python experiments/main.py --config=configs/prac.py --workdir=/tmp/prac
  python experiments/main.py --config=configs/prac.py --workdir=/tmp/imp --config.prac.mode=imp
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import config as config_lib
from sparse_cl_jax import criteria
from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax import types
from sparse_cl_jax.methods import base
from sparse_cl_jax.methods import prac_sets

DEFAULT_NORM = "batch"

MODES = ("prac", "imp", "random_subset", "random_prune", "random_reinit", "snip", "grasp",
         "synflow")
REWIND = ("lt", "rewind_lt")
DATA_RULES = prac_sets.DATA_RULES
# Modes whose search reuses a finished run's per-round record (``prac.subset_from``).
NEEDS_SOURCE = ("random_subset", "random_reinit")
MAY_USE_SOURCE = ("prac", "random_subset", "random_reinit", "snip", "grasp", "synflow")
# Modes that train each round on the recorded set of that round when given ``prac.subset_from``.
RECORDED_SETS = ("prac", "snip", "grasp", "synflow", "random_subset")
CRITERIA = ("snip", "grasp", "synflow")
SPARSE_ARG = "sparse_mask"

# Integer per-round records: ilog[t, r, field].
I_STEPS, I_EPOCHS, I_PLANNED, I_SUBSET, I_NEXT, I_CET, I_CEP, I_KEPT, I_TICKET_STEPS = range(9)
NUM_I = 9
# Float per-round records: flog[t, r, field].
F_SEARCH_VAL, F_TICKET_VAL, F_TICKET_TEST, F_TICKET_FINAL_TEST, F_TICKET_BEST_EPOCH = range(5)
NUM_F = 5



# --------------------------------------------------------------------------------------------------
# The method: wiring.


def make(config, ctx: base.Context) -> base.Method:
  """PrAC lottery tickets / IMP baselines with ``config.prac.*`` (see ``configs/prac.py``)."""
  check_config(config)
  plan = make_plan(config, ctx)
  ops = jit_ops(plan)
  return base.Method(name="prac", run_task=functools.partial(run_task, plan, ops),
                     init_state=functools.partial(init_state, plan),
                     forward_params=forward_params, wrap_tx=wrap_tx, tx_args=tx_args,
                     after_step=after_step, report=functools.partial(report, plan))


# --------------------------------------------------------------------------------------------------
# Algorithm 1.


def run_task(plan: Plan, ops: Ops, trainer, state, t: int):
  """Algorithm 1 on task ``t``: the dense network at its initialisation, then the rounds."""
  init_bs = trainer.put(plan.ctx.variables.get("batch_stats", {}))
  state = trainer.apply(state, lambda s: ops.start_task(s, trainer.initial_params(), init_bs))
  reinit = random_reinit_point(plan, trainer, t) if plan.mode == "random_reinit" else None
  for r in range(plan.rounds):
    state = run_round(plan, ops, trainer, state, t, r, reinit)
  return state


def run_round(plan: Plan, ops: Ops, trainer, state, t: int, r: int, reinit):
  """Round ``r``: train on the round's set, pick the next PrAC set, prune 20%, retrain the ticket.

  ``reinit``: random re-initialisation's ``(params, batch_stats)`` (its tickets' start), else None.
  """
  keep = imp_kept(plan.total, r + 1, plan.rate)
  remaining = imp_kept(plan.total, r, plan.rate)
  # Lines 3-4 and 11: this round's training set.
  state = trainer.apply(state, lambda s: enter_round_set(plan, ops, s, t, r))
  n_r = int(jnp.sum(state.method["member"]))
  # Line 5: train on it (no training for random pruning / random re-initialisation).
  trains = search_trains(plan, r)
  if trains:
    state, planned = search(plan, ops, trainer, state, t, r, n_r=n_r, keep=keep,
                            remaining=remaining)
  else:
    planned = 0
  # Lines 6, 10 (the next PrAC set) and 8 (the prune).
  state = trainer.apply(state, lambda s: prune_phase(plan, ops, trainer, s, t, r, keep=keep,
                                                     n_r=n_r, planned=planned, trains=trains))
  # The round's ticket, rewound and retrained on all the data.
  return retrain_ticket(plan, ops, trainer, state, t, r, reinit)


# --------------------------------------------------------------------------------------------------
# Phase 1: the round's training set.


def round_members(plan: Plan, state, t: int, r: int) -> jax.Array:
  """bool [n_max]: round ``r``'s training set.

  Round 0: all of the task's rows; PrAC from round 1: the set the previous round's prune chose.
  Given a record (``prac.subset_from``), the record's set of round ``r`` (transfer, SNIP / GraSP /
  SynFlow at PrAC's budget) or, for ``random_subset``, a random set of the record's size.
  """
  if plan.record is not None and plan.mode in RECORDED_SETS:
    if plan.mode == "random_subset":
      return random_subset_members(plan, t, r)
    return jnp.asarray(np.pad(plan.source_members[r], (0, plan.n_max - plan.n_train[t])))
  if plan.mode == "prac" and r > 0:
    return state.method["member"]  # chosen by the previous round's prune
  return valid_rows(plan, t)


def enter_round_set(plan: Plan, ops: Ops, state, t: int, r: int):
  """Stores round ``r``'s set and starts its forgetting statistics (PrAC searches only)."""
  member = round_members(plan, state, t, r)
  return ops.set_recording(state, plan.computes_sets, member, jnp.int32(r))


def valid_rows(plan: Plan, t: int) -> jax.Array:
  """bool [n_max]: the task's real (unpadded) training rows."""
  return jnp.arange(plan.n_max) < plan.n_train[t]


# --------------------------------------------------------------------------------------------------
# Phase 2: search training on the set (dynamic iterations, early-bird).


def search_trains(plan: Plan, r: int) -> bool:
  """Whether round ``r`` trains: all modes but random pruning / re-initialisation; random pruning
  only to reach a ``rewind_lt`` rewinding point in round 0."""
  return plan.mode not in ("random_prune", "random_reinit") or (
      plan.mode == "random_prune" and r == 0 and plan.rewind == "rewind_lt")


def search_schedule(plan: Plan, r: int, n_r: int, n_train: int):
  """``(planned epochs, milestone epochs, stop_after)`` of round ``r``'s search on ``n_r`` rows.

  PrAC with dynamic iterations: :func:`dynamic_schedule`; record-driven baselines: the record's
  planned epochs and milestones, stopped after the epochs the recorded round ran; random pruning:
  stopped at the rewinding point; otherwise the full schedule.
  """
  if plan.record is not None and plan.mode != "prac":
    rr = plan.record["rounds"][r]
    planned, ms, stop_after = int(rr["planned_epochs"]), rr["milestone_epochs"], int(rr["epochs"])
  elif plan.mode == "prac" and plan.dynamic_iterations:
    planned, ms = dynamic_schedule(plan.epochs, plan.milestones, n_r, n_train,
                                   min_full_lr_epochs=plan.min_full_lr_epochs)
    stop_after = None
  else:
    planned, ms, stop_after = plan.epochs, plan.milestones, None
  if plan.mode == "random_prune":  # only to reach the rewinding point
    stop_after = int(plan.rewind_epoch)
  return planned, ms, stop_after


def search(plan: Plan, ops: Ops, trainer, state, t: int, r: int, *, n_r: int, keep: int,
           remaining: int):
  """Rewinds and trains round ``r`` on its set. Returns ``(state, planned epochs)``."""
  n_train = plan.n_train[t]
  planned, ms, stop_after = search_schedule(plan, r, n_r, n_train)
  data = (None if n_r == n_train and plan.mode != "random_subset"
          else prac_sets.subset_data(trainer, state, t, plan.n_max))
  state = trainer.apply(state, lambda s: ops.rewind_to(s, s.method["rewind"]["params"],
                                                        s.method["rewind"]["batch_stats"]))
  epoch_end = functools.partial(search_epoch_end, plan, ops, trainer, t, r, stop_after=stop_after,
                                keep=keep, remaining=remaining)
  state = trainer.train(state, t, epochs=planned, phase=f"search {r}", data=data,
                        lr_milestones=milestone_fractions(planned, ms), epoch_end=epoch_end)
  return state, planned


def search_epoch_end(plan: Plan, ops: Ops, trainer, t: int, r: int, state, epoch: int, *,
                     stop_after, keep: int, remaining: int):
  """After each search epoch: the rewinding point (round 0), PrAC's best-validation snapshot and
  early-bird check; ``(state, stop)``."""
  if r == 0 and plan.rewind == "rewind_lt" and epoch + 1 == int(plan.rewind_epoch):
    state = ops.capture_rewind(state)
  if plan.mode == "prac":
    acc = trainer.accuracy(state, t, split="val", current=t)
    state = ops.snapshot_best(state, jnp.float32(acc), jnp.int32(epoch))
  eb_stop = False
  if plan.mode == "prac" and plan.early_bird:
    state, _, eb_stop = ops.early_bird_step(state, jnp.int32(keep), jnp.int32(remaining),
                                            jnp.int32(epoch))
    eb_stop = bool(eb_stop)
  guard = int(plan.rewind_epoch) if r == 0 and plan.rewind == "rewind_lt" else None
  return state, search_should_stop(epoch, eb_stop=eb_stop, stop_after=stop_after,
                                   rewind_epoch=guard)


def search_should_stop(epoch: int, *, eb_stop: bool, stop_after: int | None,
                       rewind_epoch: int | None) -> bool:
  """Whether a search ends after ``epoch`` (0-based).

  It ends on early-bird's stop or once ``stop_after`` epochs ran, but never before the rewinding
  point exists (``rewind_epoch`` epochs; None: no such point is captured in this round).
  """
  stop = eb_stop
  if stop_after is not None and epoch + 1 >= stop_after:
    stop = True
  if rewind_epoch is not None and epoch + 1 < rewind_epoch:
    stop = False  # never before the rewinding point exists
  return stop


# --------------------------------------------------------------------------------------------------
# Phase 3: the next PrAC set, then the prune.


def prune_phase(plan: Plan, ops: Ops, trainer, state, t: int, r: int, *, keep: int, n_r: int,
                planned: int, trains: bool):
  """Records the search, picks the next PrAC set (PrAC searches) and prunes down to ``keep``."""
  ints = {I_STEPS: trainer.last_train_steps if trains else 0,
          I_EPOCHS: trainer.last_train_epochs if trains else 0, I_PLANNED: planned, I_SUBSET: n_r}
  floats = {}
  if plan.mode == "prac":
    floats[F_SEARCH_VAL] = float(state.method["eval"]["best_val"])
  if plan.computes_sets:
    state, counts = update_prac_set(plan, ops, trainer, state, t, r)
    ints.update(counts)
  new = next_mask(plan, ops, trainer, state, t, r, keep)
  state, kept = ops.apply_prune(state, new, jnp.int32(r))
  ints[I_KEPT] = int(kept)  # measured, not the target
  return write_round_log(ops, state, t, r, ints, floats)


def update_prac_set(plan: Plan, ops: Ops, trainer, state, t: int, r: int):
  """The next round's set: this round's CET, from round 1 on with the examples the dense network
  (round 0's best-validation model) and this round's best-validation model disagree on.

  Returns ``(state, {I_CET: .., I_CEP: .., I_NEXT: ..})`` (the sets' sizes).
  """
  best = state.method["best"]
  pred = prac_sets.predictions(trainer, state, t, best["params"], best["batch_stats"])
  keep_c = int(plan.n_train[t] * (1.0 - plan.data_rate) ** (r + 1))
  state, counts = ops.next_set(state, pred, valid_rows(plan, t), jnp.int32(plan.offsets[t]),
                               jnp.int32(keep_c), jnp.asarray(r > 0))
  return state, dict(zip((I_CET, I_CEP, I_NEXT), map(int, jax.device_get(counts))))


def next_mask(plan: Plan, ops: Ops, trainer, state, t: int, r: int, keep: int):
  """Round ``r``'s mask under the mode's pruning rule (bool tree)."""
  if plan.mode in ("imp", "prac", "random_subset"):
    return imp_mask(ops, state, keep)
  if plan.mode in CRITERIA:
    return criterion_mask(plan, ops, trainer, state, t, r, keep)
  if plan.mode == "random_prune":
    return random_prune_mask(plan, ops, state, t, r, keep)
  return random_reinit_mask(plan, state, r)


def imp_mask(ops: Ops, state, keep: int):
  """IMP (Algorithm 1 line 8): the ``keep`` largest-magnitude alive weights, globally."""
  return ops.prune_to(criteria.magnitude(state.params), state.method["mask"], jnp.int32(keep))


# --------------------------------------------------------------------------------------------------
# Phase 4: the ticket, rewound and retrained on all the data.


def retrain_ticket(plan: Plan, ops: Ops, trainer, state, t: int, r: int, reinit):
  """Retrains round ``r``'s ticket from its rewinding point for the full schedule; records its
  test accuracy at the epoch of best validation accuracy."""
  state = trainer.apply(state, lambda s: ticket_start(ops, s, reinit))
  state = trainer.train(state, t, epochs=plan.epochs, phase=f"ticket {r}",
                        epoch_end=functools.partial(ticket_epoch_end, ops, trainer, t))
  return trainer.apply(state, lambda s: record_ticket(ops, trainer, s, t, r))


def ticket_start(ops: Ops, state, reinit):
  """Stops the forgetting statistics; the weights := the rewinding point (or ``reinit``) x mask."""
  state = ops.stop_recording(state)
  if reinit is not None:
    return ops.rewind_to(state, *reinit)
  return ops.rewind_to(state, state.method["rewind"]["params"],
                       state.method["rewind"]["batch_stats"])


def ticket_epoch_end(ops: Ops, trainer, t: int, state, epoch: int):
  """Best validation so far, and the test accuracy at it."""
  acc = trainer.accuracy(state, t, split="val", current=t)
  prev = float(state.method["eval"]["best_val"])
  state = ops.snapshot_best(state, jnp.float32(acc), jnp.int32(epoch))
  if acc > prev:
    state = ops.set_test_at_best(
        state, jnp.float32(trainer.accuracy(state, t, split="test", current=t)))
  return state, False


def record_ticket(ops: Ops, trainer, state, t: int, r: int):
  ev = state.method["eval"]
  return write_round_log(
      ops, state, t, r, {I_TICKET_STEPS: trainer.last_train_steps},
      {F_TICKET_VAL: float(ev["best_val"]), F_TICKET_TEST: float(ev["test_at_best"]),
       F_TICKET_FINAL_TEST: trainer.accuracy(state, t, split="test", current=t),
       F_TICKET_BEST_EPOCH: float(ev["best_epoch"])})


# --------------------------------------------------------------------------------------------------
# Baselines: random subsets, random pruning, random re-initialisation, SNIP / GraSP / SynFlow.


def round_key(plan: Plan, t: int, r: int, salt: int) -> jax.Array:
  """The method's key for (task, round, purpose)."""
  k = jax.random.wrap_key_data(plan.ctx.key)
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, salt), t), r)


def random_subset_members(plan: Plan, t: int, r: int) -> jax.Array:
  """bool [n_max]: a uniformly random set of the recorded round's size."""
  size = int(plan.record["rounds"][r]["size"])
  perm = jax.random.permutation(round_key(plan, t, r, 5), plan.n_train[t])[:size]
  return jnp.zeros((plan.n_max,), jnp.bool_).at[perm].set(True)


def random_prune_mask(plan: Plan, ops: Ops, state, t: int, r: int, keep: int):
  """Random pruning: ``keep`` alive weights chosen at random, globally (nested)."""
  scores = criteria.random(state.params, key=round_key(plan, t, r, 3))
  return ops.prune_to(scores, state.method["mask"], jnp.int32(keep))


def random_reinit_point(plan: Plan, trainer, t: int):
  """Random re-initialisation: fresh weights (and statistics) every ticket starts from."""
  v = models.init(plan.ctx.model, round_key(plan, t, 0, 23),
                  (1,) + tuple(plan.ctx.stream.input_shape))
  return trainer.put(v["params"]), trainer.put(v.get("batch_stats", {}))


def random_reinit_mask(plan: Plan, state, r: int):
  """Random re-initialisation: the recorded PrAC ticket of round ``r``."""
  leaves = []
  for (path, leaf), sp in zip(masks.leaves_with_paths(state.method["mask"]),
                              jax.tree.leaves(plan.spec)):
    if sp:
      pa = plan.source_pruned_at[path]
      leaves.append(jnp.asarray((pa == 0) | (pa > r + 1)))
    else:
      leaves.append(leaf)
  return jax.tree.unflatten(jax.tree.structure(state.method["mask"]), leaves)


def criterion_mask(plan: Plan, ops: Ops, trainer, state, t: int, r: int, keep: int):
  """SNIP / GraSP / SynFlow in the IMP loop: the ``keep`` highest-scoring alive weights."""
  return ops.prune_to(criterion_scores(plan, ops, trainer, state, t, r), state.method["mask"],
                      jnp.int32(keep))


def criterion_scores(plan: Plan, ops: Ops, trainer, state, t: int, r: int):
  """Scores of ``prac.score_batches`` batches of the round's training set (SynFlow: none)."""
  data = prac_sets.subset_data(trainer, state, t, plan.n_max)
  n = int(data.n)
  rows = jax.random.permutation(round_key(plan, t, r, 11), n)[:min(
      plan.score_batches * trainer.batch_size, n)]
  x = jnp.take(data.x, rows, axis=0)
  y = jnp.take(data.y, rows, axis=0)
  return scorer(plan, ops, trainer)(state.params, state.method["mask"], state.batch_stats, x, y,
                                    jnp.int32(t))


def scorer(plan: Plan, ops: Ops, trainer):
  """The jitted :func:`score_weights` (one per trainer)."""
  if id(trainer) not in ops.scorers:
    ops.scorers[id(trainer)] = jax.jit(functools.partial(score_weights, plan, _forward(trainer)))
  return ops.scorers[id(trainer)]


def score_weights(plan: Plan, fwd, params, mask, bs, x, y, t):
  """SNIP / GraSP / SynFlow scores at the masked weights (the loss on ``x``, ``y``)."""
  fp = masks.apply(params, mask)
  if plan.mode == "synflow":
    extra = {"batch_stats": bs} if plan.has_bs else {}

    def apply_fn(p, ones):
      return plan.ctx.model.apply({"params": p, **extra}, ones, task=t, train=False)

    return criteria.synflow(fp, apply_fn=apply_fn,
                            input_shape=(1,) + tuple(plan.ctx.stream.input_shape))
  valid = jnp.ones((x.shape[0],), jnp.bool_)

  def loss_fn(p):
    logits, _ = fwd(p, bs, x, valid, t, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return criteria.get(plan.mode)(fp, loss_fn=loss_fn)


# --------------------------------------------------------------------------------------------------
# The run's fixed settings.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the search needs from the config and the stream (host values, fixed for the run)."""
  ctx: base.Context
  mode: str
  rounds: int
  rate: float  # fraction of the remaining weights pruned per round
  epochs: int  # E: the full schedule
  milestones: list  # the full schedule's LR milestone epochs
  total: int  # maskable weights
  n_max: int  # padded rows per task
  num_ids: int  # stream train ids (forgetting statistics)
  n_train: tuple  # real rows per task
  offsets: tuple  # first train id per task
  has_bs: bool
  rewind: str
  rewind_epoch: Any
  dynamic_iterations: bool
  min_full_lr_epochs: int  # floor on a dynamic round's epochs before its first LR decay
  early_bird: bool
  eb_eps: float
  queue_length: int
  data_rule: str
  threshold: int
  data_rate: float
  score_batches: int
  batch_size: int
  arch: str
  record: dict | None  # a finished run's ``prac_sets`` (``prac.subset_from``)
  source_members: np.ndarray | None  # its sets, bool [rounds, num_train]
  source_pruned_at: dict | None  # its nested masks (random_reinit only)

  @property
  def spec(self) -> types.LeafSpec:
    return self.ctx.spec

  @property
  def num_tasks(self) -> int:
    return self.ctx.num_tasks

  @property
  def computes_sets(self) -> bool:
    """A PrAC search that computes its own sets (not replaying a record)."""
    return self.mode == "prac" and self.record is None


def make_plan(config, ctx: base.Context) -> Plan:
  """The :class:`Plan` of a checked config (raises on a record made for another split / model)."""
  pc = config.prac
  stream = ctx.stream
  total = spec_total(ctx.params, ctx.spec)
  if total == 0:
    raise ValueError("PrAC: the model has no maskable weights (config.mask_include / mask_exclude)")
  epochs = int(config.epochs)
  record = prac_sets.load_record(pc.subset_from) if pc.subset_from else None
  if record is not None:
    check_source(record, config, ctx)
  return Plan(
      ctx=ctx, mode=pc.mode, rounds=int(pc.rounds), rate=float(pc.rate), epochs=epochs,
      milestones=[int(round(f * epochs)) for f in config.lr_milestones], total=total,
      n_max=int(stream.x_train.shape[1]), num_ids=int(stream.num_train_ids),
      n_train=tuple(int(x) for x in np.asarray(stream.n_train)),
      offsets=tuple(int(np.asarray(stream.ids_train)[t, 0]) for t in range(ctx.num_tasks)),
      has_bs="batch_stats" in ctx.variables, rewind=pc.rewind, rewind_epoch=pc.rewind_epoch,
      dynamic_iterations=bool(pc.dynamic_iterations),
      min_full_lr_epochs=int(pc.get("min_full_lr_epochs", 0)), early_bird=bool(pc.early_bird),
      eb_eps=float(pc.eb_eps), queue_length=int(pc.queue_length), data_rule=pc.data_rule,
      threshold=int(pc.threshold), data_rate=float(pc.data_rate),
      score_batches=int(pc.score_batches), batch_size=int(config.batch_size),
      arch=str(config.model), record=record,
      source_members=prac_sets.decode_members(record) if record is not None else None,
      source_pruned_at=(prac_sets.decode_pruned_at(record)
                        if record is not None and pc.mode == "random_reinit" else None))


def check_source(record: dict, config, ctx: base.Context) -> None:
  """A record fits this run: same 1-task split, enough rounds, same masks for random_reinit."""
  pc = config.prac
  stream = ctx.stream
  n0 = int(np.asarray(stream.n_train)[0])
  if ctx.num_tasks != 1 or record["num_train"] != n0 or record["labels_crc32"] != (
      prac_sets.labels_digest(np.asarray(stream.y_train)[0, :n0])):
    raise ValueError(f"config.prac.subset_from={pc.subset_from!r} was made on another training "
                     f"split ({record['num_train']} examples); reuse it with the same dataset, "
                     "val_fraction and seed on a 1-task stream")
  if len(record["rounds"]) < int(pc.rounds):
    raise ValueError(f"config.prac.rounds={int(pc.rounds)} but config.prac.subset_from holds only "
                     f"{len(record['rounds'])} rounds")
  if pc.mode == "random_reinit":
    saved = prac_sets.decode_pruned_at(record)
    want = {p: np.shape(x) for (p, x), s in zip(masks.leaves_with_paths(ctx.params),
                                                jax.tree.leaves(ctx.spec)) if s}
    got = {p: tuple(v.shape) for p, v in saved.items()}
    if want != got:
      raise ValueError(f"config.prac.subset_from={pc.subset_from!r}: its masks are for another "
                       f"architecture ({record['arch']}); random_reinit needs the same model")


def check_config(config) -> None:
  """One-line ValueErrors naming the field, the value and what is allowed: the rules declared
  with each field of ``config.prac`` (``configs/prac.py``) and the shared ones
  (``config.validate``)."""
  config_lib.validate(config)


# --------------------------------------------------------------------------------------------------
# The method state and the trainer's hooks.


def init_state(plan: Plan, ctx: base.Context) -> dict:
  """Mask, nested-pruning record, rewinding point, early-bird, forgetting statistics, sets, logs."""
  p = ctx.params
  bs = ctx.variables.get("batch_stats", {})
  m = {
      "mask": masks.ones(p),
      "pruned_at": jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.int8), p),
      "rewind": {"params": jax.tree.map(jnp.array, p),
                 "batch_stats": jax.tree.map(jnp.array, bs)},
      "eb": early_bird_init(masks.ones(p), plan.queue_length)._asdict(),
      "fs": prac_sets.forgetting_init(plan.num_ids),
      "recording": jnp.zeros((), jnp.bool_),
      "member": jnp.zeros((plan.n_max,), jnp.bool_),
      "members": jnp.zeros((plan.rounds, plan.n_max), jnp.bool_),
      "dense_pred": jnp.zeros((plan.n_max,), jnp.int32),
      "eval": _fresh_eval(),
      "ilog": jnp.zeros((plan.num_tasks, plan.rounds, NUM_I), jnp.int32),
      "flog": jnp.full((plan.num_tasks, plan.rounds, NUM_F), -1.0, jnp.float32)  # -1: not recorded
  }
  if plan.mode == "prac":
    m["best"] = {"params": jax.tree.map(jnp.array, p), "batch_stats": jax.tree.map(jnp.array, bs)}
  return m


def _fresh_eval() -> dict:
  return {"best_val": jnp.float32(-1.0), "test_at_best": jnp.float32(-1.0),
          "best_epoch": jnp.int32(-1)}


def forward_params(params, aux, m, task, current):
  del aux, task, current
  return masks.apply(params, m["mask"])


def wrap_tx(tx):
  return optax.chain(tx, transforms.keep_sparse(mask_arg=SPARSE_ARG))


def tx_args(m, task):
  del task
  return {SPARSE_ARG: m["mask"]}


def after_step(m, out, task):
  """Forgetting statistics of the minibatch, while the round records them."""
  del task
  fs = prac_sets.forgetting_update(m["fs"], out["ids"], out["correct"],
                                   out["valid"] & m["recording"])
  return {**m, "fs": fs}


# --------------------------------------------------------------------------------------------------
# Jitted updates of the train state (pure; :func:`jit_ops` binds the run's constants; the sets'
# own updates are in :mod:`prac_sets`).


class Ops(NamedTuple):
  """The run's jitted state updates (the functions of the same names here and in
  :mod:`prac_sets`) and the cache of jitted scorers."""
  start_task: Any
  rewind_to: Any
  set_recording: Any
  stop_recording: Any
  early_bird_step: Any
  snapshot_best: Any
  set_test_at_best: Any
  apply_prune: Any
  prune_to: Any
  next_set: Any
  capture_rewind: Any
  write_log: Any
  scorers: dict  # id(trainer) -> jitted score_weights


def jit_ops(plan: Plan) -> Ops:
  """The jitted state updates with the run's constants bound (mask spec, sizes, thresholds)."""
  spec = plan.spec
  return Ops(
      start_task=jax.jit(start_task),
      rewind_to=jax.jit(functools.partial(rewind_to, queue_length=plan.queue_length)),
      set_recording=jax.jit(functools.partial(prac_sets.set_recording, num_ids=plan.num_ids)),
      stop_recording=jax.jit(stop_recording),
      early_bird_step=jax.jit(functools.partial(early_bird_step, spec=spec, eps=plan.eb_eps)),
      snapshot_best=jax.jit(snapshot_best),
      set_test_at_best=jax.jit(set_test_at_best),
      apply_prune=jax.jit(functools.partial(apply_prune, spec=spec)),
      prune_to=jax.jit(functools.partial(prune_to, spec=spec)),
      next_set=jax.jit(functools.partial(prac_sets.next_set, n_max=plan.n_max,
                                         rule=plan.data_rule, threshold=plan.threshold)),
      capture_rewind=jax.jit(capture_rewind),
      write_log=jax.jit(write_log),
      scorers={})


def start_task(state, init_params, init_bs):
  """Dense network at the initial weights; the rewinding point is the initialisation."""
  m = dict(state.method)
  m["mask"] = masks.ones(init_params)
  m["pruned_at"] = jax.tree.map(jnp.zeros_like, m["pruned_at"])
  m["rewind"] = {"params": init_params, "batch_stats": init_bs}
  m["members"] = jnp.zeros_like(m["members"])
  return state._replace(params=jax.tree.map(jnp.copy, init_params),
                        batch_stats=jax.tree.map(jnp.copy, init_bs), method=m)


def rewind_to(state, start_params, start_bs, *, queue_length: int):
  """Params := the rewinding point times the current mask; fresh per-op records."""
  m = dict(state.method)
  params = masks.apply(start_params, m["mask"])
  m["eb"] = early_bird_init(m["mask"], queue_length)._asdict()
  m["eval"] = _fresh_eval()
  if "best" in m:
    m["best"] = {"params": params, "batch_stats": start_bs}
  return state._replace(params=params, batch_stats=jax.tree.map(jnp.copy, start_bs), method=m)


def stop_recording(state):
  m = dict(state.method)
  m["recording"] = jnp.zeros((), jnp.bool_)
  return state._replace(method=m)


def early_bird_step(state, keep, remaining, epoch, *, spec, eps: float):
  """One epoch's early-bird check on the mask the next prune would give. ``(state, dist, stop)``."""
  m = dict(state.method)
  new = magnitude_prune(state.params, m["mask"], keep, spec)
  eb, dist, stop = early_bird_update(EarlyBird(**m["eb"]), new, remaining, epoch, spec, eps=eps)
  m["eb"] = eb._asdict()
  return state._replace(method=m), dist, stop


def snapshot_best(state, acc, epoch):
  """Best validation accuracy so far, its epoch and (PrAC) its weights."""
  m = dict(state.method)
  ev = dict(m["eval"])
  better = acc > ev["best_val"]
  ev["best_val"] = jnp.where(better, acc, ev["best_val"])
  ev["best_epoch"] = jnp.where(better, epoch, ev["best_epoch"])
  m["eval"] = ev
  if "best" in m:
    cur = {"params": state.params, "batch_stats": state.batch_stats}
    m["best"] = jax.tree.map(lambda new, old: jnp.where(better, new, old), cur, m["best"])
  return state._replace(method=m)


def set_test_at_best(state, test):
  m = dict(state.method)
  m["eval"] = {**m["eval"], "test_at_best": jnp.asarray(test, jnp.float32)}
  return state._replace(method=m)


def apply_prune(state, new_mask, r, *, spec):
  """Mask := ``new_mask`` (round ``r`` noted in ``pruned_at``); ``(state, kept weights)``."""
  m = dict(state.method)
  pruned = jax.tree.map(lambda old, new: old & ~new, m["mask"], new_mask)
  m["pruned_at"] = jax.tree.map(lambda pa, pr: jnp.where(pr, (r + 1).astype(jnp.int8), pa),
                                m["pruned_at"], pruned)
  m["mask"] = new_mask
  return (state._replace(params=masks.apply(state.params, new_mask), method=m),
          masks.count(new_mask, spec))


def capture_rewind(state):
  m = dict(state.method)
  m["rewind"] = {"params": jax.tree.map(jnp.copy, state.params),
                 "batch_stats": jax.tree.map(jnp.copy, state.batch_stats)}
  return state._replace(method=m)


def write_log(state, t, r, ivals, iset, fvals, fset):
  m = dict(state.method)
  m["ilog"] = m["ilog"].at[t, r].set(jnp.where(iset, ivals, m["ilog"][t, r]))
  m["flog"] = m["flog"].at[t, r].set(jnp.where(fset, fvals, m["flog"][t, r]))
  return state._replace(method=m)


def write_round_log(ops: Ops, state, t: int, r: int, ints: dict, floats: dict):
  """Writes the given fields of round ``r``'s records (one compiled shape for all calls)."""
  iv = np.zeros((NUM_I,), np.int32)
  iset = np.zeros((NUM_I,), bool)
  for k, v in ints.items():
    iv[k], iset[k] = int(v), True
  fv = np.zeros((NUM_F,), np.float32)
  fset = np.zeros((NUM_F,), bool)
  for k, v in floats.items():
    fv[k], fset[k] = float(v), True
  return ops.write_log(state, jnp.int32(t), jnp.int32(r), jnp.asarray(iv), jnp.asarray(iset),
                       jnp.asarray(fv), jnp.asarray(fset))


# --------------------------------------------------------------------------------------------------
# Dynamic iterations.


def dynamic_schedule(epochs: int, milestone_epochs, subset: int, total: int, *,
                     min_full_lr_epochs: int = 0):
  """Epochs and LR milestone epochs of a round on ``subset`` of ``total`` examples.

  As coded (``min_full_lr_epochs=0``): ``int(epochs * subset / total)`` epochs (at least 1) and
  ``int(m * subset / total)`` for every milestone epoch ``m``; the authors' ``args.epochs`` /
  ``decreasing_lr`` rescaling. With ``min_full_lr_epochs=k > 0`` a round whose first milestone
  would come before epoch ``k`` is shifted: every milestone and the round's end move later by the
  same number of epochs, so the round trains at least ``k`` epochs at the full learning rate and
  keeps the scaled tail after its first decay (no milestones: at least ``k`` epochs).
  """
  if total <= 0 or not 0 <= subset <= total:
    raise ValueError(f"subset={subset} must be in [0, total={total}]")
  e = max(1, int(epochs * subset / total))
  ms = [int(m * subset / total) for m in milestone_epochs]
  k = int(min_full_lr_epochs)
  if k > 0:
    shift = max(0, k - min(ms)) if ms else max(0, k - e)
    e, ms = e + shift, [m + shift for m in ms]
  return e, ms


def milestone_fractions(epochs: int, milestone_epochs) -> tuple:
  """Milestone epochs as the trainer's fractions of the phase's epochs (exact after rounding)."""
  return tuple(m / epochs for m in milestone_epochs)


# --------------------------------------------------------------------------------------------------
# Pruning.


def imp_kept(total: int, prunes: int, rate: float = 0.2) -> int:
  """Weights kept after ``prunes`` IMP prunes: ``round(total * (1 - rate) ** prunes)``."""
  return int(round(total * (1.0 - rate) ** prunes))


def spec_total(params, spec) -> int:
  """Number of maskable weights."""
  return sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(spec)) if s)


def prune_to(scores: types.Scores, mask: types.Masks, keep, spec: types.LeafSpec) -> types.Masks:
  """The ``keep`` highest-scoring alive weights, globally over the maskable leaves (bool tree).

  Pruned positions stay pruned (only ``mask`` positions are candidates); leaves outside ``spec``
  stay all-True. Exact count, deterministic ties (:func:`topk.topk_mask`).
  """
  sel = topk.topk_mask(scores, keep, candidates=mask, scope="global", spec=spec)
  return jax.tree.map(lambda m, k, s: (m & k) if s else m, mask, sel, spec)


def magnitude_prune(params, mask, keep, spec):
  """IMP's global magnitude prune of the alive weights down to ``keep``."""
  return prune_to(criteria.magnitude(params), mask, keep, spec)


def hamming(a: types.Masks, b: types.Masks, spec: types.LeafSpec) -> jax.Array:
  """Number of maskable positions where two masks differ (int32)."""
  return sum(jnp.sum(x != y, dtype=jnp.int32)
             for x, y, s in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(spec)) if s)


# --------------------------------------------------------------------------------------------------
# Early-bird stopping (You et al. 2020 as extended by the authors' main_PrAC_imp.py).


class EarlyBird(NamedTuple):
  """Early-bird state of one round."""
  last: Any  # bool tree: the previous epoch's would-be mask
  queue: jax.Array  # f32 [queue_length], newest first, initialised to ones
  started: jax.Array  # bool: a distance above eps has been seen in this round


def early_bird_init(mask: types.Masks, queue_length: int) -> EarlyBird:
  return EarlyBird(last=jax.tree.map(jnp.array, mask), queue=jnp.ones((queue_length,), jnp.float32),
                   started=jnp.zeros((), jnp.bool_))


def early_bird_update(eb: EarlyBird, new_mask, remaining, epoch, spec, *, eps: float,
                      warmup: int = 0):
  """One epoch's check. Returns ``(eb, distance, stop)``; works under ``jax.jit``.

  As coded: epoch 0 only records its mask. Later epochs compute the distance to the previous
  epoch's mask normalised by ``remaining`` (unpruned weights at the round's start); once a
  distance above ``eps`` was seen (and past ``warmup`` epochs) it is pushed into the queue; stop
  when the queue's maximum is below ``eps``. The previous mask is not replaced on a stop.
  """
  epoch = jnp.asarray(epoch, jnp.int32)
  later = epoch > 0
  dist = hamming(eb.last, new_mask, spec).astype(jnp.float32) / jnp.maximum(
      jnp.asarray(remaining, jnp.float32), 1.0)
  started = jnp.where(later, eb.started | (dist > eps), eb.started)
  push = later & (epoch > warmup) & started
  queue = jnp.where(push, jnp.concatenate([dist[None], eb.queue[:-1]]), eb.queue)
  stop = later & (jnp.max(queue) < eps)
  last = jax.tree.map(lambda old, new: jnp.where(stop, old, new), eb.last, new_mask)
  return EarlyBird(last=last, queue=queue, started=started), dist, stop


def early_bird_stop_epoch(mask_sequence, remaining, spec, *, eps: float, queue_length: int = 5,
                          warmup: int = 0) -> int | None:
  """The epoch (0-based) at which a sequence of per-epoch masks stops training; None if never."""
  eb = early_bird_init(mask_sequence[0], queue_length)
  for e, m in enumerate(mask_sequence):
    eb, _, stop = early_bird_update(eb, m, remaining, e, spec, eps=eps, warmup=warmup)
    if bool(stop):
      return e
  return None


# --------------------------------------------------------------------------------------------------
# Report.


def report(plan: Plan, ctx: base.Context, state) -> dict:
  """Per-round rows (density, steps, set sizes, ticket accuracies), step totals, the record."""
  del ctx
  m = jax.device_get(state.method)
  ilog, flog = np.asarray(m["ilog"]), np.asarray(m["flog"])
  T, rounds, total = plan.num_tasks, plan.rounds, plan.total
  n_train = list(plan.n_train)
  per_task = [round_rows(plan, ilog[t], flog[t], n_train[t]) for t in range(T)]
  last = per_task[-1]
  steps_total = sum(r["steps"] for r in last)
  nb = -(-n_train[-1] // plan.batch_size)
  vanilla = rounds * plan.epochs * nb
  out = {
      "rounds": last,
      "steps_total": steps_total,
      "vanilla_imp_steps_total": vanilla,
      "iterations_saved_vs_vanilla_imp": 1.0 - steps_total / vanilla,
      "density_per_task": [int(ilog[t, rounds - 1, I_KEPT]) / total for t in range(T)],
      "expected_density_per_task": [imp_kept(total, rounds, plan.rate) / total] * T,
      "prac_mode": plan.mode,
      # Every optimiser step of the run: the search's plus the ticket retrainings'.
      "optimizer_steps_run": int(jax.device_get(state.step)),
  }
  if T > 1:
    out["rounds_per_task"] = per_task
  kept_leaves = jax.tree.leaves(m["mask"])
  out["final_density_measured"] = sum(
      int(np.sum(k)) for k, s in zip(kept_leaves, jax.tree.leaves(plan.spec)) if s) / total
  out["prac_sets"] = sets_record(plan, m, last)
  return out


def round_rows(plan: Plan, ilog: np.ndarray, flog: np.ndarray, n_train: int) -> list:
  """One task's per-round report rows from its ``ilog`` / ``flog`` records."""
  rows, cum = [], 0
  own_sets = plan.computes_sets
  for r in range(plan.rounds):
    iv, fv = ilog[r], flog[r]
    cum += int(iv[I_STEPS])
    rows.append({
        "round": r, "density": int(iv[I_KEPT]) / plan.total, "steps": int(iv[I_STEPS]),
        "steps_cumulative": cum, "epochs": int(iv[I_EPOCHS]),
        "planned_epochs": int(iv[I_PLANNED]), "subset_size": int(iv[I_SUBSET]),
        "subset_fraction": int(iv[I_SUBSET]) / n_train,
        "next_subset_size": int(iv[I_NEXT]) if own_sets else None,
        "critical_training": int(iv[I_CET]) if own_sets else None,
        "critical_pruning": int(iv[I_CEP]) if own_sets else None,
        "search_val_accuracy": _f(fv[F_SEARCH_VAL]),
        "val_accuracy": _f(fv[F_TICKET_VAL]), "test_accuracy": _f(fv[F_TICKET_TEST]),
        "final_test_accuracy": _f(fv[F_TICKET_FINAL_TEST]),
        "best_epoch": int(fv[F_TICKET_BEST_EPOCH]) if fv[F_TICKET_BEST_EPOCH] >= 0 else None,
        "ticket_steps": int(iv[I_TICKET_STEPS])})
  return rows


def sets_record(plan: Plan, m: dict, last: list) -> dict:
  """The last task's ``prac_sets`` record (:func:`prac_sets.encode_sets`)."""
  n = plan.n_train[-1]
  members = np.asarray(m["members"])[:, :n]
  ms_rows = [dynamic_schedule(plan.epochs, plan.milestones, r["subset_size"], n,
                              min_full_lr_epochs=plan.min_full_lr_epochs)[1]
             if plan.mode == "prac" and plan.dynamic_iterations else plan.milestones for r in last]
  if plan.record is not None and plan.mode != "prac":
    ms_rows = [plan.record["rounds"][r]["milestone_epochs"] for r in range(plan.rounds)]
  pruned = {p: np.asarray(x) for (p, x), s in zip(masks.leaves_with_paths(m["pruned_at"]),
                                                  jax.tree.leaves(plan.spec)) if s}
  return prac_sets.encode_sets(
      members, [r["planned_epochs"] for r in last], [r["epochs"] for r in last], ms_rows, pruned,
      y=np.asarray(plan.ctx.stream.y_train)[plan.num_tasks - 1, :n], arch=plan.arch)


def _f(x) -> float | None:
  """A recorded value, None where nothing was recorded (-1; the checkpoint refuses NaN)."""
  x = float(x)
  return x if math.isfinite(x) and x >= 0 else None


def _forward(trainer):
  """The trainer's model application (normalisation, compute dtype) for score computations."""
  from sparse_cl_jax import train  # pylint: disable=g-import-not-at-top
  return train.Forward(trainer, jnp.int32(0))
