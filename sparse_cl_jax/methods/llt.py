"""Lifelong Lottery Tickets (Chen, Zhang, Liu, Chang, Wang; ICLR 2021): class-incremental tickets.

Paper: "Long Live the Lottery: The Existence of Winning Tickets in Lifelong Learning"; the
authors' code is VITA-Group/Lifelong-Learning-LTH (``main_TD.py``, ``main_BU.py``,
``trainer.py``). ``config.llt.mode`` selects one of four systems that share one class-IL framework:

* The framework (paper App. A2.2, ``trainer.train_KD``). An exemplar memory keeps
  ``llt.exemplars_per_class`` images of every class seen (``data.select_exemplars``, random or
  herding). The model has two heads on the same features (``OUTPUT_COPIES = 2``: main head = the
  first K outputs, auxiliary head = the next K; evaluation reads the main head, argmax over every
  class seen so far). Task 1 trains both heads on the same batches of its own data (``train()``
  as coded). Every later step draws four sub-batches of ``batch_size // 4`` rows: ``random`` (new
  data and old exemplars together, the epoch's source) for the auxiliary head; ``new`` and
  ``old`` (class-balanced: ``int(sub / (1 + t))`` new rows and ``int(sub * t / (1 + t))`` old
  rows, the rest of each static sub-batch marked invalid) for the main head; ``unlabeled`` (pool
  images with the previous model's stored logits) for lottery teaching. The loss is
  ``aux_CE + gamma1 * KD_aux + gamma2 * (main_CE + gamma1 * KD_main)`` (as coded: gamma1 = 1,
  gamma2 = 0.5), main_CE summed over the balanced rows / sub (the as-coded ``coef_new``/``coef_old``
  weighting). All four sub-batches go through the network as one batch (one forward).
* Lottery teaching (Sec. 4.3). After each task, the penultimate features of the unlabeled pool and
  of every stored exemplar are computed; for each exemplar in memory order its ``llt.knn``
  nearest pool images by squared L2, greedily without duplicates (``select_knn`` as coded), are
  kept with the model's logits (both heads) on them. Every later step adds KD (soft
  cross-entropy at temperature T, times T^2, over the previous model's classes: ``loss_fn_kd``) on
  a sub-batch of them into both heads. The query runs on the device in blocks of exemplars whose
  distance rows fit ``llt.knn_memory_mb``.
* ``'td'`` top-down pruning (Sec. 4.1, Alg. 1, ``main_TD.py``): after task t,
  ``llt.curriculum[t]`` IMP rounds, each removing ``llt.prune_fraction`` of the remaining maskable
  weights by global magnitude (conv and dense kernels, never heads or norms), retraining between
  rounds (``llt.retrain_epochs`` at ``llt.retrain_lr``); then the kernels are rewound
  (``llt.rewind``: original init 'init' = LT, 'random' re-init, previous task's weights 'task' =
  TR, 'late' = the weights after epoch ``llt.late_epoch`` of task 1, or 'none' = fine-tune) and
  the next task trains that ticket. After the last task's rounds the last task is trained again
  on the final ticket (as coded). The accuracy row after task t is the model trained on task t.
* ``'bu'`` bottom-up pruning (Sec. 4.2, Alg. 2, ``main_BU.py``): task 1 is pruned round by round
  while the validation accuracy stays within ``llt.bu_max_drop`` of the dense model or the
  sparsity is below ``llt.bu_base_sparsity``. For each later task a dense reference continues
  from the previous reference, and the ticket starts from the previous reference's weights masked
  (TR, or ``llt.rewind``); the ticket's mask is kept when its validation accuracy is within
  ``llt.bu_accept`` of the reference's; otherwise ``llt.bu_regrow`` of the pruned positions are
  re-grown from the new reference by magnitude and pruned back ``llt.prune_fraction`` of the
  re-grown ones at a time while the same rule holds. Masks only grow after task 1.
  ``llt.l1 > 0`` adds an l1 penalty on the kernels (the l1 BU variant of Table 1).
* ``'dense'``: the same class-IL training without pruning (the paper's full dense model).
* ``'imp'``: plain IMP, as the TD machinery with a uniform schedule of the same total number of
  rounds, no lottery teaching and no rewinding (pruned weights are fine-tuned).

``results.json`` adds ``remaining_weights`` (fraction of the maskable weights the model evaluated
after each task computes with; also ``density_per_task``), ``rewind_points`` (per task, where the
ticket's kernels were rewound to) and ``llt``: the resolved curriculum / rewinding / lottery
teaching, pool size, unlabeled images selected after each task, ``prune_rounds`` (TD: rounds
after each task; BU: task 1's accepted rounds, later the pruning-back rounds after a re-growth),
and for BU the reference's and the ticket's validation accuracies and which tasks re-grew.

Every decision uses validation data (never test). Everything a resumed run needs (memory, query
results, stored logits, masks, rewinding weights, the BU reference) lives in the method state, so
a run resumed inside a task ends with identical results.


The module reads top-down: :func:`make` wires the phases; :class:`Setup` is what it resolves once
from the config; then the method state, the training of a task on its sources (the step's loss
is :mod:`llt_step`), what runs after each task's training (memory and lottery teaching's query,
:mod:`llt_teaching`), the three task loops (:func:`run_dense`, :func:`run_td` = Alg. 1,
:func:`run_bu` = Alg. 2) with their state operations, the pure pruning pieces, the report and the
config checks.

Example::

  python experiments/main.py --config=configs/llt.py --workdir=/tmp/llt
  python experiments/main.py --config=configs/llt.py:fashion_mnist --workdir=/tmp/llt_fm \\
      --config.llt.mode=bu
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_cl_jax import masks
from sparse_cl_jax import models
from sparse_cl_jax import topk
from sparse_cl_jax import transforms
from sparse_cl_jax.methods import base
from sparse_cl_jax.methods import llt_step
from sparse_cl_jax.methods import llt_teaching

DEFAULT_NORM = "batch"  # class-IL, one shared head: plain BatchNorm (PreAct-ResNet18 as coded)
OUTPUT_COPIES = 2  # main head = first K logits, auxiliary head = next K

MODES = ("td", "bu", "dense", "imp")
REWINDS = ("auto", "init", "random", "task", "late", "none")
SELECTIONS = ("random", "herding")
TD_CURRICULUM_5 = (1, 1, 2, 3, 5)  # paper Sec. 4.1 / main_TD.py --prune_scheduler

# Rewinding codes kept in the method state (per task) and their names in results.json.
_NO_REWIND, _INIT, _RANDOM, _TASK, _LATE = 0, 1, 2, 3, 4
_REWIND_CODES = {"none": _NO_REWIND, "init": _INIT, "random": _RANDOM, "task": _TASK,
                 "late": _LATE}
_ACTIVE_ARG = "llt_active"


# --------------------------------------------------------------------------------------------------
# The method: make() only wires the phases below.


def make(config, ctx: base.Context) -> base.Method:
  """Lifelong Lottery Tickets with ``config.llt.*`` (module docstring; configs/llt.py)."""
  setup = build_setup(config, ctx)
  penalty = None
  if setup.l1 > 0:
    penalty = functools.partial(l1_penalty, spec=setup.spec, l1=setup.l1)
  step = functools.partial(llt_step.step_loss, forward_params=forward_params,
                           num_outputs=setup.num_outputs, sub=setup.sub,
                           seen=jnp.asarray(setup.seen), gamma1=setup.gamma1, gamma2=setup.gamma2,
                           temperature=setup.temperature)
  return base.Method(name="llt", run_task=functools.partial(run_task, setup),
                     init_state=functools.partial(init_state, setup),
                     forward_params=forward_params, wrap_tx=wrap_tx, tx_args=tx_args,
                     penalty=penalty, report=functools.partial(report, setup), step_loss=step,
                     eval_logits=functools.partial(eval_logits, num_outputs=setup.num_outputs))


def run_task(setup: Setup, trainer, state, t: int):
  """Task ``t`` (0-based) of the mode's system."""
  if setup.mode == "dense":
    return run_dense(setup, trainer, state, t)
  if setup.mode in ("td", "imp"):
    return run_td(setup, trainer, state, t)
  return run_bu(setup, trainer, state, t)


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """What :func:`make` resolves once from the config and the context (static for the run)."""
  # The system.
  mode: str
  rounds: tuple[int, ...]  # TD / IMP rounds after each task (0 for dense and BU)
  rewind_kind: str  # resolved: none | init | random | task | late
  teach: bool  # lottery teaching on
  # The stream and the model.
  stream: Any
  model: Any
  key: jax.Array  # the method's own key (typed)
  num_tasks: int
  num_outputs: int  # K: one head's logits
  seen: np.ndarray  # int32 [T]: classes seen up to task t
  input_shape: tuple[int, ...]
  spec: Any  # maskable leaves
  total: int  # maskable weights
  # Training.
  epochs: int
  batch_size: int
  sub: int  # rows of each of the four sub-batches
  gamma1: float
  gamma2: float
  temperature: float
  l1: float
  retrain_epochs: int
  retrain_lr: float
  late_epoch: int
  # Memory and lottery teaching.
  per_class: int
  selection: str
  mem_cap: int
  pool: np.ndarray  # uint8 [P, ...] (empty without lottery teaching)
  knn: int
  knn_memory_mb: float
  unl_cap: int  # rows of the stored query
  # Pruning.
  frac: float  # of the remaining weights per round
  bu_max_drop: float
  bu_base_sparsity: float
  bu_accept: float
  bu_regrow: float
  bu_max_rounds: int
  cache: dict  # the pool on the device, put there once

  @property
  def keep_late(self) -> bool:
    return self.rewind_kind == "late"


def build_setup(config, ctx: base.Context) -> Setup:
  """Checks the config and resolves the run's :class:`Setup` (loads the pool)."""
  _check(config)
  lc = config.llt
  settings = resolved(config)
  stream = ctx.stream
  spec = ctx.spec
  total = int(sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(ctx.params),
                                                  jax.tree.leaves(spec)) if s))
  if total == 0:
    raise ValueError("Lifelong Lottery Tickets: the model has no maskable weights (config."
                     "mask_include / mask_exclude)")
  input_shape = tuple(stream.input_shape)
  teach = settings["teach"]
  mem_cap = int(lc.exemplars_per_class) * int(stream.num_classes_total)
  pool = (llt_teaching.load_pool(config, stream) if teach
          else np.zeros((0,) + input_shape, np.uint8))
  P = int(pool.shape[0])
  if teach and P == 0:
    raise ValueError(f"config.llt.pool={lc.pool!r} holds no images (with pool='auto', cap the "
                     "labeled stream: --config.max_train_per_task=...)")
  return Setup(
      mode=lc.mode, rounds=settings["rounds"], rewind_kind=settings["rewind"], teach=teach,
      stream=stream, model=ctx.model, key=jax.random.wrap_key_data(ctx.key),
      num_tasks=ctx.num_tasks, num_outputs=int(stream.num_outputs),
      seen=np.asarray(stream.head_mask).sum(axis=1).astype(np.int32), input_shape=input_shape,
      spec=spec, total=total, epochs=config.epochs, batch_size=config.batch_size,
      sub=int(config.batch_size) // 4, gamma1=float(lc.gamma1), gamma2=float(lc.gamma2),
      temperature=float(lc.temperature), l1=float(lc.l1), retrain_epochs=int(lc.retrain_epochs),
      retrain_lr=float(lc.retrain_lr), late_epoch=int(lc.late_epoch),
      per_class=int(lc.exemplars_per_class), selection=lc.exemplar_selection, mem_cap=mem_cap,
      pool=pool, knn=int(lc.knn), knn_memory_mb=float(lc.knn_memory_mb),
      unl_cap=max(1, min(mem_cap * int(lc.knn), P)), frac=float(lc.prune_fraction),
      bu_max_drop=float(lc.bu_max_drop), bu_base_sparsity=float(lc.bu_base_sparsity),
      bu_accept=float(lc.bu_accept), bu_regrow=float(lc.bu_regrow),
      bu_max_rounds=int(lc.bu_max_rounds), cache={})


# --------------------------------------------------------------------------------------------------
# The method state: the mask the model computes with, the memory, the stored query, per-task
# records, and (for pruning) the snapshot, the ticket's start and the BU reference.


def init_state(setup: Setup, ctx: base.Context) -> dict:
  """The method state for the whole stream (shapes never change between tasks)."""
  params = ctx.params
  bs = ctx.variables.get("batch_stats", {})
  T = setup.num_tasks
  m = {
      "mask": masks.ones(params),
      "use_mask": jnp.asarray(setup.mode != "dense"),
      "mem": {"x": jnp.zeros((setup.mem_cap,) + setup.input_shape, jnp.uint8),
              "y": jnp.zeros((setup.mem_cap,), jnp.int32)},
      "mem_end": jnp.zeros((T + 1,), jnp.int32),  # memory rows of tasks < t, at index t
      "unl": empty_query(setup), "unl_next": empty_query(setup),
      "remaining": jnp.zeros((T,), jnp.float32),
      "rewind": jnp.zeros((T,), jnp.int32),
      "rounds": jnp.zeros((T,), jnp.int32),
      "selected": jnp.zeros((T,), jnp.int32),
      "ref_acc": jnp.full((T,), -1.0, jnp.float32),  # -1: not measured (BU only)
      "ticket_acc": jnp.full((T,), -1.0, jnp.float32),
      "final_acc": jnp.full((T,), -1.0, jnp.float32),
      "regrown": jnp.zeros((T,), jnp.int32),
      "count_start": jnp.zeros((T,), jnp.int32),  # BU: mask count when task t began
  }
  if setup.mode in ("td", "imp", "bu"):
    m.update(snap=_zeros_like(params), snap_bs=_zeros_like(bs), snap_mask=masks.ones(params),
             start=_zeros_like(params), start_bs=_zeros_like(bs), next_mask=masks.ones(params))
  if setup.mode == "bu":
    m.update(ref=_zeros_like(params), ref_bs=_zeros_like(bs), base_mask=masks.ones(params))
  if setup.keep_late:
    m["late"] = _zeros_like(params)
  return m


def empty_query(setup: Setup) -> dict:
  """A stored lottery-teaching query with no rows (pool rows, teacher logits, count, classes)."""
  return {"idx": jnp.zeros((setup.unl_cap,), jnp.int32),
          "logits": jnp.zeros((setup.unl_cap, OUTPUT_COPIES * setup.num_outputs), jnp.float32),
          "n": jnp.int32(0), "cols": jnp.int32(0)}


def active(m):
  """The mask the model computes with: the ticket's, or all-True while ``use_mask`` is off."""
  off = ~m["use_mask"]
  return jax.tree.map(lambda k: k | off, m["mask"])


def forward_params(params, aux, m, task, current):
  del aux, task, current
  return masks.apply(params, active(m))


def wrap_tx(tx):
  return optax.chain(tx, transforms.keep_sparse(mask_arg=_ACTIVE_ARG))


def tx_args(m, task):
  del task
  return {_ACTIVE_ARG: active(m)}


def l1_penalty(params, aux, m, task, *, spec, l1: float):
  """The l1 BU variant's penalty: ``l1`` times the summed |w| of the active kernels."""
  del aux, task
  fp = masks.apply(params, active(m))
  return l1 * sum(jnp.sum(jnp.abs(p)) for p, s in zip(jax.tree.leaves(fp),
                                                      jax.tree.leaves(spec)) if s)


def eval_logits(logits, *, num_outputs: int):
  """Predictions read the main head (the first K logits)."""
  return logits[:, :num_outputs]


# --------------------------------------------------------------------------------------------------
# Training a task (App. A2.2): its sources; every step's loss is llt_step.step_loss.


def sources(setup: Setup, trainer, state, t: int) -> dict:
  """The sources of task t's training (``t`` 0-based; task 1 has one).

  Later tasks: ``random`` (the task's data and the memory of tasks < t), ``new`` and ``old`` (the
  balanced halves) and, with lottery teaching, ``unlabeled``: the pool rows of the task's stored
  query (``unl``) with their stored teacher logits.
  """
  d = trainer.task_data(t)
  if t == 0:
    return {"random": _source({"x": d.x, "y": d.y, "n": d.n}, setup.batch_size, "epoch")}
  # Copies: the train step donates the state, so a source must not share its buffers.
  m = _copy({"mem": state.method["mem"], "mem_end": state.method["mem_end"],
             "unl": state.method["unl"]})
  n_old = m["mem_end"][t]
  x, y, n = random_rows(d.x, d.y, d.n, m["mem"]["x"], m["mem"]["y"], n_old)
  sub = setup.sub
  out = {"random": _source({"x": x, "y": y, "n": n}, sub, "epoch"),
         "new": _source({"x": d.x, "y": d.y, "n": d.n}, sub, "cycle"),
         "old": _source({"x": m["mem"]["x"], "y": m["mem"]["y"], "n": n_old}, sub, "cycle")}
  if setup.teach:
    u = m["unl"]
    pool = llt_teaching.pool_device(trainer, setup.pool, setup.cache)
    out["unlabeled"] = _source({"x": jnp.take(pool, u["idx"], axis=0), "logits": u["logits"],
                                "n": u["n"]}, sub, "cycle", augment=False)
  return out


@jax.jit
def random_rows(task_x, task_y, n_new, mem_x, mem_y, n_old):
  """The task's ``n_new`` rows followed by the memory's ``n_old`` (the ``random`` source)."""
  n_rows = task_x.shape[0] + mem_x.shape[0]
  i = jnp.arange(n_rows, dtype=jnp.int32)
  src = jnp.clip(jnp.where(i < n_new, i, task_x.shape[0] + i - n_new), 0, n_rows - 1)
  x = jnp.take(jnp.concatenate([task_x, mem_x]), src, axis=0)
  y = jnp.take(jnp.concatenate([task_y, mem_y]), src, axis=0)
  return x, y, (n_new + n_old).astype(jnp.int32)


def train_phase(setup: Setup, trainer, state, t: int, *, epochs, phase: str, retrain=False,
                epoch_end=None):
  """Trains task t on its :func:`sources`; a pruning retrain at ``llt.retrain_lr``, flat."""
  if retrain:
    return trainer.train(state, t, epochs=epochs, phase=phase, lr=setup.retrain_lr,
                         lr_milestones=(), sources=sources(setup, trainer, state, t),
                         epoch_end=epoch_end)
  return trainer.train(state, t, epochs=epochs, phase=phase,
                       sources=sources(setup, trainer, state, t), epoch_end=epoch_end)


def first_training(setup: Setup, trainer, state, t: int, phase: str = "train"):
  """Task t's full training (task 1 keeps the late-rewinding weights when asked to)."""
  keep_late = t == 0 and setup.keep_late
  hook = functools.partial(save_late_weights, late_epoch=setup.late_epoch) if keep_late else None
  if keep_late and setup.late_epoch == 0:
    state = trainer.apply(state, lambda s: _with_m(s, late=_copy(trainer.initial_params())))
  return train_phase(setup, trainer, state, t, epochs=setup.epochs, phase=phase, epoch_end=hook)


def save_late_weights(state, epoch: int, *, late_epoch: int):
  """``epoch_end`` hook: the weights after epoch ``late_epoch`` (1-based) as ``late``."""
  if epoch + 1 == late_epoch:
    state = _with_m(state, late=_copy(state.params))
  return state, False


# --------------------------------------------------------------------------------------------------
# After each task's training: the memory and lottery teaching's query (Sec. 4.3).


def after_training(setup: Setup, trainer, state, t: int):
  """Memory and (for every task but the last) the lottery-teaching query."""
  state = trainer.apply(state, lambda s: store_exemplars(setup, trainer, s, t))
  if setup.teach and t < setup.num_tasks - 1:
    state = trainer.apply(state, lambda s: store_query(setup, trainer, s, t))
  return state


def store_exemplars(setup: Setup, trainer, s, t: int):
  """Task t's exemplars appended to the memory (:func:`llt_teaching.add_exemplars`)."""
  return _with_m(s, **llt_teaching.add_exemplars(
      trainer, s, t, stream=setup.stream, per_class=setup.per_class, selection=setup.selection,
      key=setup.key))


def store_query(setup: Setup, trainer, s, t: int):
  """The query with the current model as the teacher, kept as the next task's ``unl_next``."""
  nxt = llt_teaching.query(trainer, s, t,
                           pool=llt_teaching.pool_device(trainer, setup.pool, setup.cache),
                           k=setup.knn, memory_mb=setup.knn_memory_mb, mem_cap=setup.mem_cap,
                           capacity=setup.unl_cap, cols=setup.seen[t])
  return _with_m(s, unl_next=trainer.put(nxt), selected=s.method["selected"].at[t].set(nxt["n"]))


# --------------------------------------------------------------------------------------------------
# Dense: the class-IL model without pruning.


def run_dense(setup: Setup, trainer, state, t: int):
  """Task t trains the dense model (distilling from the last query); nothing is pruned."""
  if t > 0:
    state = trainer.apply(state, lambda s: _with_m(s, unl=_copy(s.method["unl_next"])))
  state = first_training(setup, trainer, state, t)
  state = after_training(setup, trainer, state, t)
  return trainer.apply(state, lambda s: record_task(s, t, remaining=1.0))


# --------------------------------------------------------------------------------------------------
# Top-down pruning (Sec. 4.1, Alg. 1; plain IMP is the same loop without rewinding).


def run_td(setup: Setup, trainer, state, t: int):
  """Train the ticket of the rounds before t; prune ``rounds[t]`` rounds; stash the next ticket.

  The model evaluated after task t is the trained one (restored from the snapshot); the ticket
  the next task trains is kept as ``start`` / ``next_mask``. After the last task's rounds the last
  task is trained again on the final ticket (as coded).
  """
  if t > 0:
    state = trainer.apply(state, start_td_ticket)
  state = first_training(setup, trainer, state, t)
  state = after_training(setup, trainer, state, t)
  n_rounds = setup.rounds[t]
  state = trainer.apply(state, save_snapshot)
  state = td_prune_rounds(setup, trainer, state, t)
  code = _REWIND_CODES[setup.rewind_kind] if n_rounds > 0 else _NO_REWIND
  state = trainer.apply(state, lambda s: stash_ticket(setup, trainer, s, t, code, n_rounds))
  if t == setup.num_tasks - 1 and n_rounds > 0:  # as coded: the last task retrains the ticket
    state = trainer.apply(state, lambda s: start_final_ticket(setup, s, t))
    state = train_phase(setup, trainer, state, t, epochs=setup.epochs, phase="ticket retrain")
  return state


def td_prune_rounds(setup: Setup, trainer, state, t: int):
  """Task t's IMP rounds, each keeping ``kept_after`` of every round so far, retraining between.

  The count is a host mirror (decisions never read the state: it may be a later one on replay);
  before the rounds of task t the mask holds the rounds of tasks < t.
  """
  n_rounds = setup.rounds[t]
  done = sum(setup.rounds[:t])
  for r in range(n_rounds):
    keep = kept_after(setup.total, setup.frac, done + r + 1)
    state = trainer.apply(state, lambda s, keep=keep: prune_round(s, setup.spec, keep))
    if r < n_rounds - 1 and setup.retrain_epochs > 0:
      state = train_phase(setup, trainer, state, t, epochs=setup.retrain_epochs,
                          phase=f"prune round {r + 1}", retrain=True)
  return state


def start_td_ticket(s):
  """Task t > 0 begins on the stashed ticket, and its distillation targets are the last query."""
  m = s.method
  nxt = {"mask": _copy(m["next_mask"]), "unl": _copy(m["unl_next"])}
  return s._replace(params=_copy(m["start"]), batch_stats=_copy(m["start_bs"]),
                    method={**m, **nxt})


def stash_ticket(setup: Setup, trainer, s, t: int, code: int, n_rounds: int):
  """The pruned ticket, rewound (``code``), kept for the next task; the trained model restored."""
  m = s.method
  src = rewind_source(setup, trainer, s, t, m["snap"]) if code != _NO_REWIND else None
  start = rewind(s.params, m["mask"], src, setup.spec) if src is not None else masks.apply(
      s.params, m["mask"])
  m = {**m, "start": _copy(start), "start_bs": _copy(s.batch_stats),
       "next_mask": _copy(m["mask"]), "mask": _copy(m["snap_mask"])}
  s = s._replace(params=_copy(m["snap"]), batch_stats=_copy(m["snap_bs"]), method=m)
  return record_task(s, t, remaining=density(m, setup.spec, setup.total), rewind=code,
                     rounds=n_rounds)


def start_final_ticket(setup: Setup, s, t: int):
  """The last task's retrain starts from the final ticket (its density is the one reported)."""
  m = s.method
  s = s._replace(params=_copy(m["start"]), batch_stats=_copy(m["start_bs"]),
                 method={**m, "mask": _copy(m["next_mask"])})
  return record_task(s, t, remaining=density(s.method, setup.spec, setup.total))


def rewind_source(setup: Setup, trainer, state, t: int, snap_params):
  """The weights a ticket's kernels are rewound to (None: no rewinding)."""
  kind = setup.rewind_kind
  if kind == "init":
    return trainer.initial_params()
  if kind == "random":
    fresh = models.init(setup.model, jax.random.fold_in(setup.key, 1000 + t),
                        (1,) + setup.input_shape)
    return fresh["params"]
  if kind == "task":
    return snap_params
  if kind == "late":
    return state.method["late"]
  return None


# --------------------------------------------------------------------------------------------------
# Bottom-up pruning (Sec. 4.2, Alg. 2).


def run_bu(setup: Setup, trainer, state, t: int):
  """Task 1 finds the base ticket; every later task may re-grow it from a dense reference."""
  if t == 0:
    return bu_first_task(setup, trainer, state)
  return bu_later_task(setup, trainer, state, t)


def bu_first_task(setup: Setup, trainer, state):
  """Task 1: train dense (the first reference), then prune down to the base sparsity."""
  t = 0
  state = trainer.apply(state, lambda s: _with_m(s, use_mask=jnp.asarray(False)))
  state = first_training(setup, trainer, state, t)
  state = after_training(setup, trainer, state, t)
  state = trainer.apply(state, save_reference)
  ref_acc = val_acc(trainer, state, t)
  state = trainer.apply(state, lambda s: save_snapshot(_with_m(s, use_mask=jnp.asarray(True))))
  state, acc, kept_rounds = bu_base_rounds(setup, trainer, state, ref_acc)
  state = trainer.apply(state, restore_snapshot)
  return trainer.apply(state, lambda s: record_task(
      s, t, remaining=density(s.method, setup.spec, setup.total), rewind=_NO_REWIND,
      ref_acc=ref_acc, ticket_acc=acc, final_acc=acc, rounds=kept_rounds))


def bu_base_rounds(setup: Setup, trainer, state, ref_acc: float):
  """Task 1's IMP rounds while :func:`keep_pruning` holds; the last accepted one is snapshotted.

  Returns:
    (state, the accepted ticket's validation accuracy, accepted rounds).
  """
  t = 0
  acc = ref_acc
  kept_rounds = 0
  for r in range(setup.bu_max_rounds):
    keep = kept_after(setup.total, setup.frac, r + 1)
    state = trainer.apply(state, lambda s, keep=keep: prune_round(s, setup.spec, keep))
    if setup.retrain_epochs > 0:
      state = train_phase(setup, trainer, state, t, epochs=setup.retrain_epochs,
                          phase=f"prune round {r + 1}", retrain=True)
    acc_r = val_acc(trainer, state, t)
    if not keep_pruning(ref_acc - acc_r, 1.0 - keep / setup.total, max_drop=setup.bu_max_drop,
                        base_sparsity=setup.bu_base_sparsity):
      break
    acc = acc_r
    kept_rounds = r + 1
    state = trainer.apply(state, save_snapshot)
  return state, acc, kept_rounds


def bu_later_task(setup: Setup, trainer, state, t: int):
  """Task t > 0: the dense reference continues; the ticket is accepted or re-grows capacity."""
  state = trainer.apply(state, lambda s: start_reference(s, t, setup.spec))
  state = first_training(setup, trainer, state, t, phase="reference")
  state = after_training(setup, trainer, state, t)  # the reference is the teacher (as coded)
  state = trainer.apply(state, save_reference)
  ref_acc = val_acc(trainer, state, t)
  code = _REWIND_CODES[setup.rewind_kind]
  state = trainer.apply(state, lambda s: start_bu_ticket(setup, trainer, s, t, code))
  state = train_phase(setup, trainer, state, t, epochs=setup.epochs, phase="ticket")
  acc = val_acc(trainer, state, t)
  ticket_acc = acc
  regrown = kept_rounds = 0
  if not bu_accepts(ref_acc, acc, setup.bu_accept):
    regrown = 1
    state, acc, kept_rounds = regrow_rounds(setup, trainer, state, t, ref_acc, acc)
  return trainer.apply(state, lambda s: record_task(
      s, t, remaining=density(s.method, setup.spec, setup.total), rewind=code, ref_acc=ref_acc,
      ticket_acc=ticket_acc, final_acc=acc, regrown=regrown, rounds=kept_rounds))


def regrow_rounds(setup: Setup, trainer, state, t: int, ref_acc: float, acc: float):
  """Re-grow ``bu_regrow`` of the pruned positions, then prune them back while the rule holds.

  The mask count comes from the state, written by this task's first operation (a replayed run
  that resumes later in the task reads the same value).

  Returns:
    (state, the accepted ticket's validation accuracy, pruning-back rounds behind it).
  """
  count = int(jax.device_get(state.method["count_start"])[t])
  grow = int(round(setup.bu_regrow * (setup.total - count)))
  state = trainer.apply(state, lambda s: expand_ticket(s, setup.spec, grow))
  count += grow
  grown = grow
  kept_rounds = 0
  for r in range(setup.bu_max_rounds):
    if setup.retrain_epochs > 0:
      state = train_phase(setup, trainer, state, t, epochs=setup.retrain_epochs,
                          phase=f"regrow round {r + 1}", retrain=True)
    acc_r = val_acc(trainer, state, t)
    if r > 0 and not keep_pruning(ref_acc - acc_r, 1.0 - count / setup.total,
                                  max_drop=setup.bu_max_drop,
                                  base_sparsity=setup.bu_base_sparsity):
      state = trainer.apply(state, restore_snapshot)
      break
    acc = acc_r
    kept_rounds = r  # pruning-back rounds behind the accepted model
    state = trainer.apply(state, save_snapshot)
    if r == setup.bu_max_rounds - 1 or grown == 0:
      break
    keep_grown = kept_after(grow, setup.frac, r + 1)
    state = trainer.apply(
        state, lambda s, keep_grown=keep_grown: prune_back_round(s, setup.spec, keep_grown))
    count -= grown - keep_grown
    grown = keep_grown
  return state, acc, kept_rounds


def bu_accepts(ref_acc: float, acc: float, accept: float) -> bool:
  """A ticket is kept when its accuracy is within ``accept`` of the reference's (``main_BU``)."""
  return not ref_acc - acc > accept


def keep_pruning(drop: float, sparsity: float, *, max_drop: float, base_sparsity: float) -> bool:
  """As coded (main_BU.py): go on while the drop is within ``max_drop`` or the sparsity is below
  ``base_sparsity``."""
  return drop <= max_drop or sparsity < base_sparsity


def val_acc(trainer, state, t: int) -> float:
  """Mean validation accuracy over the tasks seen (recorded evaluations)."""
  return float(np.mean([trainer.evaluate(state, j, split="val", current=t)
                        for j in range(t + 1)]))


def start_reference(s, t: int, spec):
  """Task t > 0's dense reference continues from the previous reference (also the ticket's TR
  point, kept as ``start``); the mask count the task begins with is recorded."""
  m = s.method
  m = {**m, "unl": _copy(m["unl_next"]), "start": _copy(m["ref"]),
       "start_bs": _copy(m["ref_bs"]), "use_mask": jnp.asarray(False),
       "count_start": m["count_start"].at[t].set(masks.count(m["mask"], spec))}
  return s._replace(params=_copy(m["ref"]), batch_stats=_copy(m["ref_bs"]), method=m)


def start_bu_ticket(setup: Setup, trainer, s, t: int, code: int):
  """The ticket starts from the previous reference (TR) or another rewinding point, masked."""
  m = s.method
  src = rewind_source(setup, trainer, s, t, m["start"]) if code != _NO_REWIND else m["start"]
  params = rewind(m["start"], m["mask"], src, setup.spec)
  return s._replace(params=_copy(params), batch_stats=_copy(m["start_bs"]),
                    method={**m, "use_mask": jnp.asarray(True)})


def expand_ticket(s, spec, grow: int):
  """Re-growth from the reference: its weights under the grown mask; the old mask kept as base."""
  m = s.method
  new = regrow(m["mask"], m["ref"], spec, jnp.int32(grow))
  m = {**m, "base_mask": _copy(m["mask"]), "mask": new}
  return s._replace(params=masks.apply(m["ref"], new), batch_stats=_copy(m["ref_bs"]), method=m)


def prune_back_round(s, spec, keep_grown: int):
  """One pruning-back round: ``keep_grown`` of the re-grown positions stay."""
  m = s.method
  new = prune_back(m["base_mask"], m["mask"], s.params, spec, jnp.int32(keep_grown))
  return s._replace(params=masks.apply(s.params, new), method={**m, "mask": new})


def save_reference(s):
  return _with_m(s, ref=_copy(s.params), ref_bs=_copy(s.batch_stats))


# --------------------------------------------------------------------------------------------------
# State operations shared by TD and BU.


def prune_round(s, spec, keep: int):
  """One IMP round on the state: the mask keeps ``keep`` weights and the params are masked."""
  new = prune_keep(s.method["mask"], s.params, spec, jnp.int32(keep))
  return s._replace(params=masks.apply(s.params, new), method={**s.method, "mask": new})


def save_snapshot(s):
  """The trained (TD) / last accepted (BU) model and its mask, kept as ``snap``."""
  return _with_m(s, snap=_copy(s.params), snap_bs=_copy(s.batch_stats),
                 snap_mask=_copy(s.method["mask"]))


def restore_snapshot(s):
  m = s.method
  return s._replace(params=_copy(m["snap"]), batch_stats=_copy(m["snap_bs"]),
                    method={**m, "mask": _copy(m["snap_mask"])})


def record_task(state, t: int, **values):
  """Per-task records (``remaining``, ``rewind``, ``rounds``, BU accuracies) at index t."""
  m = state.method
  upd = {}
  for k, v in values.items():
    upd[k] = m[k].at[t].set(jnp.asarray(v, m[k].dtype))
  return _with_m(state, **upd)


def density(m, spec, total: int):
  """Fraction of the maskable weights the mask keeps."""
  return masks.count(m["mask"], spec).astype(jnp.float32) / jnp.float32(total)


def _copy(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _with_m(state, **fields):
  m = dict(state.method)
  m.update(fields)
  return state._replace(method=m)


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _source(data, batch_size, order, augment=True):
  from sparse_cl_jax import train  # pylint: disable=g-import-not-at-top  (train imports methods)
  return train.Source(data=data, batch_size=int(batch_size), order=order, augment=augment)


# --------------------------------------------------------------------------------------------------
# Pure pruning pieces (each tested on its own).


def kept_after(n: int, fraction: float, rounds: int) -> int:
  """Weights kept of ``n`` after ``rounds`` IMP rounds of ``fraction`` each: ``round(n * (1 -
  fraction) ** rounds)``, the nearest weight to exactly 0.8^r for the default 20% (as coded,
  PyTorch's pruning container rounds every round, which drifts by a few weights)."""
  return int(round(int(n) * (1.0 - float(fraction)) ** int(rounds)))


def expected_counts(total: int, rounds, fraction: float) -> list[int]:
  """TD/IMP: maskable weights of the model evaluated after each task (exact counts).

  The model of task t carries the rounds of tasks before t; the last task is retrained on the
  ticket of every round (as coded), so its count has them all.
  """
  before = np.cumsum((0,) + tuple(rounds))
  return [kept_after(total, fraction, int(r)) for r in before[:len(rounds) - 1]] + [
      kept_after(total, fraction, int(before[-1]))]


def prune_keep(mask, params, spec, keep) -> masks.types.Masks:
  """One IMP round: the ``keep`` largest-|w| weights among those ``mask`` keeps (global scope).

  Only maskable leaves (``spec``) take part; others stay all-True. ``keep`` may be traced; the
  result keeps exactly ``min(keep, count)`` weights (:func:`topk.topk_mask`).
  """
  cand = masks.where_spec(spec, mask, fill=False)
  kept = topk.topk_mask(jax.tree.map(jnp.abs, params), keep, candidates=cand, scope="global",
                        spec=spec)
  return masks.where_spec(spec, masks.logical_and(kept, cand))


def regrow(mask, ref_params, spec, grow):
  """BU capacity expansion: ``mask`` plus the ``grow`` largest-|w| of the reference's weights at the
  positions ``mask`` pruned (``partly_prune_model`` as coded). The result contains ``mask``."""
  pruned = jax.tree.map(lambda m, s: (~m) & s, mask, spec)
  grown = topk.topk_mask(jax.tree.map(jnp.abs, ref_params), grow, candidates=pruned,
                         scope="global", spec=spec)
  return jax.tree.map(lambda m, g, p, s: (m | (g & p)) if s else jnp.ones_like(m), mask, grown,
                      pruned, spec)


def prune_back(base_mask, mask, params, spec, keep):
  """BU pruning back: keep ``keep`` largest-|w| of the re-grown positions (``mask`` minus
  ``base_mask``); ``base_mask`` is never touched (``partly_prune_model_iter``)."""
  grown = jax.tree.map(lambda m, b, s: (m & ~b) if s else jnp.zeros_like(m), mask, base_mask, spec)
  kept = topk.topk_mask(jax.tree.map(jnp.abs, params), keep, candidates=grown, scope="global",
                        spec=spec)
  return jax.tree.map(lambda b, k, g, s: (b | (k & g)) if s else jnp.ones_like(b), base_mask, kept,
                      grown, spec)


def rewind(params, mask, source, spec):
  """The ticket's start: maskable kernels from ``source`` times ``mask``; every other leaf of
  ``params`` unchanged (as coded, ``utils.rewind`` touches the pruned conv weights only)."""
  return jax.tree.map(
      lambda p, m, s, sp: jnp.where(m, s, jnp.zeros_like(s)).astype(p.dtype) if sp else p,
      params, mask, source, spec)




# --------------------------------------------------------------------------------------------------
# results.json.


def report(setup: Setup, ctx: base.Context, state) -> dict:
  """``remaining_weights``, ``rewind_points`` and the ``llt`` block of results.json."""
  del ctx
  m = jax.device_get(state.method)
  mode, T = setup.mode, setup.num_tasks
  names = {v: k for k, v in _REWIND_CODES.items()}
  rem = [float(v) for v in np.asarray(m["remaining"])]
  points = []
  for t in range(T):
    code = int(m["rewind"][t])
    if code == _LATE:
      points.append(f"late: after epoch {setup.late_epoch} of task 1")
    elif code == _TASK:
      points.append(f"task: weights after task {t + 1}" if mode != "bu"
                    else f"task: reference weights after task {t}")
    else:
      points.append(names[code])
  out = {"remaining_weights": rem, "density_per_task": rem, "rewind_points": points,
         "llt": {"mode": mode, "curriculum": list(setup.rounds), "rewind": setup.rewind_kind,
                 "lottery_teaching": setup.teach, "pool_size": int(setup.pool.shape[0]),
                 "unlabeled_selected": [int(v) for v in np.asarray(m["selected"])],
                 "exemplars": int(np.asarray(m["mem_end"])[-1]),
                 "prune_rounds": [int(v) for v in np.asarray(m["rounds"])]}}
  if mode == "bu":
    out["llt"].update(
        reference_val_accuracy=[float(v) for v in np.asarray(m["ref_acc"])],
        ticket_val_accuracy=[float(v) for v in np.asarray(m["ticket_acc"])],
        final_ticket_val_accuracy=[float(v) for v in np.asarray(m["final_acc"])],
        regrown=[bool(v) for v in np.asarray(m["regrown"])])
  if mode in ("td", "imp"):
    out["expected_density_per_task"] = [
        c / setup.total for c in expected_counts(setup.total, setup.rounds, setup.frac)]
  if mode == "dense":
    out["expected_density_per_task"] = [1.0] * T
  return out


# --------------------------------------------------------------------------------------------------
# Config checks and the settings a mode implies.


def parse_curriculum(value, num_tasks: int, mode: str) -> tuple[int, ...]:
  """IMP rounds after each task: ``llt.curriculum`` ('auto' or 'n1,n2,...')."""
  if value in ("auto", "", None):
    if num_tasks == len(TD_CURRICULUM_5):
      rounds = TD_CURRICULUM_5
    elif mode in ("td", "imp"):
      raise ValueError(f"config.llt.curriculum='auto' is the paper's 5-task schedule "
                       f"{','.join(map(str, TD_CURRICULUM_5))}; with num_tasks={num_tasks} give "
                       f"{num_tasks} comma-separated round counts, e.g. --config.llt.curriculum="
                       f"{','.join(['1'] * num_tasks)}")
    else:
      return (0,) * num_tasks
    if mode == "imp":  # no curriculum: the same total, spread evenly (earlier tasks first)
      total = sum(rounds)
      rounds = tuple(total // num_tasks + (1 if i < total % num_tasks else 0)
                     for i in range(num_tasks))
    return tuple(rounds)
  try:
    rounds = tuple(int(v) for v in str(value).split(","))
  except ValueError:
    rounds = ()
  if len(rounds) != num_tasks or min(rounds) < 0:
    raise ValueError(f"config.llt.curriculum={value!r} must be 'auto' or {num_tasks} "
                     "comma-separated non-negative round counts (one per task)")
  return rounds



def _check(config) -> None:
  """What the rules of ``config.llt``'s fields (``configs/llt.py``) do not say: the scenario and
  the sub-batches."""
  if config.incremental != "class":
    raise ValueError(f"config.incremental={config.incremental!r}: Lifelong Lottery Tickets is a "
                     "class-incremental method; set --config.incremental=class")
  if config.batch_size < 4:
    raise ValueError(f"config.batch_size={config.batch_size} must be >= 4 (four sub-batches of "
                     "batch_size // 4 rows)")


def resolved(config) -> dict:
  """The settings the mode implies: curriculum, rewinding, lottery teaching."""
  lc = config.llt
  mode = lc.mode
  rounds = parse_curriculum(lc.curriculum, int(config.num_tasks), mode)
  if mode in ("dense", "bu"):
    rounds = (0,) * int(config.num_tasks)
  rw = lc.rewind
  if rw == "auto":
    rw = {"td": "init", "bu": "task", "imp": "none", "dense": "none"}[mode]
  teach = bool(lc.lottery_teaching) and mode != "imp"
  if teach and str(lc.pool) == "none":
    raise ValueError("config.llt.pool='none' leaves lottery teaching without images; set "
                     "--config.llt.lottery_teaching=False or name a pool")
  return {"rounds": rounds, "rewind": rw, "teach": teach}

