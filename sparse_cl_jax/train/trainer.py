"""The :class:`Trainer`: places a task stream on the device(s) and runs a method's operations.

It only orchestrates: the step bodies are pure functions (:mod:`~sparse_cl_jax.train.steps`,
:mod:`~sparse_cl_jax.train.evaluation`) that it jits once per phase kind with the run's
constants as data; the epochs run in :mod:`~sparse_cl_jax.train.loops`; the operation log that
replays a resumed run is :mod:`~sparse_cl_jax.train.oplog`; device placement is
:mod:`~sparse_cl_jax.train.placement`.

* The stream's arrays live on the device(s) once; a task's data is selected with a traced index.
* The steps are jitted once: the task id, step, learning rates and every element-wise mask are
  traced values, so all tasks and phases of the same kind share one compilation;
  ``trace_counts`` counts traces so tests can assert it.
* A method drives its phases through *recorded* operations: :meth:`train`, :meth:`apply`,
  :meth:`record` and :meth:`evaluate` (replayed on resume).
* Training augmentation (``config.augment``) runs inside the jitted step on the gathered
  ``uint8`` batch, keyed by (seed, task, operation, epoch, batch); evaluation never augments.
* Padding never reaches a statistic: the rows that top up the last batch of an epoch (or of an
  evaluation pass) are passed to the model as ``valid=False`` and weigh 0 in loss and accuracy.
* :meth:`train` leaves the last epoch's running training (loss, accuracy) in
  :attr:`last_train_stats` (also when a resumed run skips the operation).
* With more than one device (``config.num_devices``), batches are sharded over a
  ``jax.sharding`` mesh axis ``'data'`` and the state is replicated (data parallelism by GSPMD).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sparse_cl_jax import data as data_lib
from sparse_cl_jax import protocol
from sparse_cl_jax import runtime
from sparse_cl_jax import types
from sparse_cl_jax.train import evaluation
from sparse_cl_jax.train import loops
from sparse_cl_jax.train import oplog as oplog_lib
from sparse_cl_jax.train import optim
from sparse_cl_jax.train import placement as placement_lib
from sparse_cl_jax.train import sources as sources_lib
from sparse_cl_jax.train import state as state_lib
from sparse_cl_jax.train import steps

TrainState = state_lib.TrainState
TaskData = state_lib.TaskData
DeviceData = state_lib.DeviceData
EpochStats = state_lib.EpochStats


def jit_body(body, env: steps.StepEnv, consts, **jit_kwargs):
  """``jax.jit`` of a step body ``body(env, c, *args)``: ``env`` bound, ``consts`` passed as data.

  ``donate_argnums`` count the arguments after ``c``. Returns ``f(*args, **kwargs)``.
  """
  if "donate_argnums" in jit_kwargs:
    jit_kwargs["donate_argnums"] = tuple(i + 1 for i in jit_kwargs["donate_argnums"])
  if env.mesh is not None:  # the state stays replicated (GSPMD may leave per-row values split)
    jit_kwargs.setdefault("out_shardings", jax.sharding.NamedSharding(
        env.mesh, jax.sharding.PartitionSpec()))
  jitted = jax.jit(functools.partial(body, env), **jit_kwargs)
  return lambda *args, **kwargs: jitted(consts, *args, **kwargs)


def compile_programs(env: steps.StepEnv, consts, lockstep=None, cell: str | None = None,
                     put=None):
  """The run's jitted programs: the epoch-chunk steps, outputs and evaluation counts.

  With ``lockstep`` (a sweep), the step and evaluation programs go through it, so that the
  cells of a sweep whose programs are the same computation run them as one vmapped program.
  """

  def prog(kind, body, **jit_kwargs):
    single = jit_body(body, env, consts, **jit_kwargs)
    if lockstep is None:
      return single
    return lockstep.program(cell, kind, body, env, consts, single, put)

  programs = loops.Programs(
      run_steps=prog("run_steps", steps.run_steps, donate_argnums=(0,)),
      host_step=prog("host_step", steps.host_step, donate_argnums=(0, 1)),
      run_multi=prog("run_multi", steps.run_multi, donate_argnums=(0,),
                     static_argnames=("spec",)),
      host_multi=prog("host_multi", steps.host_multi, donate_argnums=(0, 1),
                      static_argnames=("spec",)),
      permutation=jax.jit(data_lib.epoch_permutation, static_argnums=(2,)))
  outputs = jit_body(evaluation.outputs, env, consts, static_argnames=("features",))
  return programs, outputs, prog("eval", evaluation.eval_counts)


class Forward(steps.Forward):
  """``Forward(trainer, step)``: the trainer's model application, for a method's own jitted code.

  The same callable ``Method.step_loss`` receives inside a step (:class:`steps.Forward`), bound to
  this trainer's static setup and run constants; ``step`` keys dropout.
  """

  def __init__(self, trainer: "Trainer", step):
    super().__init__(trainer.env, trainer._consts, step)  # pylint: disable=protected-access


class Trainer:
  """Runs a method's phases on one task stream with jitted steps (see the module docstring)."""

  # Called after every training epoch (after the divergence check, before the epoch's checkpoint)
  # as on_epoch(trainer, state, task=, phase=, op=, epoch=, epochs=, loss=, accuracy=,
  # learning_rate=, bar=): the harness's per-epoch log. ``state`` is read, never changed.
  on_epoch: Callable[..., None] | None = None

  def __init__(self, *, config, model, stream, method: protocol.Method, ctx: protocol.Context,
               save_fn: Callable[[TrainState, dict], None] | None = None, lockstep=None,
               cell: str | None = None):
    self.config = config
    self.model = model
    self.stream = stream
    self._method = method
    self.ctx = ctx
    self.save_fn = save_fn
    # What the processes of a multi-process run agree on at an epoch end is named by this.
    self.scope = cell or "run"
    self.has_batch_stats = "batch_stats" in ctx.variables
    self.class_il = stream.incremental == "class"
    self.tx = method.wrap_tx(optim.make_base_tx(config))
    self.aux_tx = method.aux_tx or optax.identity()
    self.batch_size = int(config.batch_size)
    self.eval_batch_size = int(config.eval_batch_size)
    self.key = jax.random.key_data(jax.random.key(config.seed))
    self.run_meta: dict = {}
    self.oplog = oplog_lib.OpLog()
    self._initial_params = None
    # The latest train() call's last epoch (loss, accuracy) (None before any epoch ran), and the
    # epochs and optimiser steps it ran (replayed on resume).
    self.last_train_stats: EpochStats | None = None
    self.last_train_epochs = 0
    self.last_train_steps = 0
    self.placement = placement_lib.for_run(
        config, run_mesh=None if lockstep is None else lockstep.mesh)
    self.mesh, self.replicated = self.placement.mesh, self.placement.replicated
    self.env = steps.make_env(config, model, method, self.tx, self.aux_tx, self.class_il,
                              self.has_batch_stats, self.mesh)
    self.trace_counts = self.env.trace_counts
    self.augment, self.augment_padding = self.env.augment, self.env.augment_padding

    self.train_data, self.val_data, self.test_data = self.placement.stream(stream)
    self.head_mask = self.put(jnp.asarray(stream.head_mask))
    # What differs between runs of the same shapes reaches the jitted functions as data.
    self._consts = self.put(steps.run_constants(self.key, stream))
    self.loop = runtime.epoch_loop(config.get("epoch_loop", "auto"))
    # In a sweep (``lockstep``, :mod:`.lockstep`) the programs are shared with the other cells.
    self.programs, self._outputs, self._eval_counts = compile_programs(
        self.env, self._consts, lockstep, cell, self.put)

  @property
  def method(self) -> protocol.Method:
    """The method the steps call (replaceable before the first step traces, e.g. in tests)."""
    return self._method

  @method.setter
  def method(self, value: protocol.Method) -> None:
    self._method = value
    self.env.method = value

  def put(self, x):
    """``x`` (any pytree) placed on the trainer's device(s): replicated over the mesh if any."""
    return self.placement.put(x)

  def initial_params(self) -> types.Params:
    """The network's initial params on the device(s), placed once (read-only: never donated).

    Methods that re-initialise weights (growth, individual models, reference models) pass them
    to their jitted functions as data, so the values are not baked into the compiled code.
    """
    if self._initial_params is None:
      self._initial_params = self.put(self.ctx.params)
    return self._initial_params

  def task_data(self, t: int, split: str = "train") -> TaskData:
    """Task ``t``'s padded arrays of a split, on the device."""
    d = {"train": self.train_data, "val": self.val_data, "test": self.test_data}[split]
    return TaskData(d.x[t], d.y[t], d.ids[t], d.n[t])

  def init_state(self) -> TrainState:
    """The initial state: fresh params, optimiser states, the method's state."""
    return self.put(state_lib.initial(self.ctx, self.method, self.tx, self.aux_tx))

  def reset_optimizer(self, state: TrainState) -> TrainState:
    """Fresh optimiser moments (same shapes: no recompilation)."""
    return state._replace(opt_state=self.put(self.tx.init(state.params)),
                          aux_opt_state=self.put(self.aux_tx.init(state.aux)))

  def augment_batch(self, x, aug_key, b):
    """``config.augment`` of a gathered ``uint8`` batch (see :func:`steps.augment_batch`)."""
    return steps.augment_batch(self.env, self._consts, x, aug_key, b)

  def outputs(self, state: TrainState, data, *, view_task: int, current: int | None = None,
              features: bool = False) -> dict:
    """Evaluation-mode outputs (logits, optionally features) of every row of ``data``.

    See :func:`sparse_cl_jax.train.evaluation.outputs_of` for the arguments and what comes back.
    """
    return evaluation.outputs_of(self._outputs, self.put, state, data, view_task=view_task,
                                 current=current, features=features)

  # ------------------------------------------------------------------------------------------------
  # The operation log (resume).

  @property
  def resume(self) -> oplog_lib.Resume | None:
    """Where an interrupted run restarts (set by the experiment before the first task)."""
    return self.oplog.resume

  @resume.setter
  def resume(self, value: oplog_lib.Resume | None) -> None:
    self.oplog.resume = value

  @property
  def _op_log(self) -> dict:
    return self.oplog.log

  def begin_task(self, t: int) -> None:
    """Starts the operation counter of task ``t`` (called by the experiment loop)."""
    self.oplog.begin_task(t)

  def op_key(self, epoch: int = 0, *, op: int | None = None) -> jax.Array:
    """A key derived from (seed, task, operation, epoch): identical when a run is replayed.

    ``op`` defaults to the operation about to be recorded next.
    """
    return self.oplog.key(self.key, epoch, op=op)

  # ------------------------------------------------------------------------------------------------
  # Recorded operations (the only way a method's run_task touches the state).

  def train(self, state: TrainState, t: int, *, epochs: int, phase: str = "train",
            lr: float | None = None, lr_milestones=None, lr_decay: float | None = None,
            aux_lr: float = 0.0, aux_lr_fn: Callable[[int], float] | None = None,
            data: TaskData | None = None, hook: Callable[[TrainState, int], TrainState] | None = None,
            hook_every: int = 0, reset_optimizer: bool = True,
            sources: dict[str, sources_lib.Source] | None = None,
            epoch_end: Callable[[TrainState, int], tuple[TrainState, bool]] | None = None
            ) -> TrainState:
    """Trains task ``t`` for ``epochs`` epochs (a recorded operation). Donates ``state``.

    Args:
      state: the train state (donated: do not use it afterwards).
      t: task index (selects the head, per-task norm and, by default, the data).
      epochs: number of epochs.
      phase: a label for logs and the progress bar.
      lr: base learning rate (default ``config.learning_rate``), step-decayed by ``lr_decay`` at
        ``lr_milestones`` (fractions of ``epochs``; default the config's).
      aux_lr / aux_lr_fn: learning rate of the method's aux variables (constant / per epoch).
      data: replacement training arrays of the same padded shape (exemplars, a data subset).
      hook: ``hook(state, steps_done) -> state`` run every ``hook_every`` steps of this operation
        (e.g. a topology update); it runs between jitted chunks, so the step itself stays plain.
      reset_optimizer: start from fresh optimiser moments.
      sources: the multi-source step: a dict of :class:`Source` (exactly one with
        ``order='epoch'``, which sets the epoch's length); every step gathers a batch of each and
        calls ``method.step_loss``. ``data`` must then be None. Randomness (orders, augmentation)
        derives from (seed, task, operation, epoch, source), so a resumed run replays exactly.
      epoch_end: ``epoch_end(state, epoch) -> (state, stop)`` runs on the host after every epoch
        (after the divergence check, before the epoch's checkpoint); ``stop`` ends the operation
        early (e.g. early-bird stopping). Keep whatever it decides on in ``state`` so that a
        resumed run decides the same.

    Afterwards :attr:`last_train_stats` holds the last epoch's running means of the training loss
    and accuracy over its valid rows (in training mode, on the augmented batches; CPG's "train
    accuracy" rule reads it). It is recorded in the operation log, so a resumed run that skips
    this operation restores it; so are :attr:`last_train_epochs` and :attr:`last_train_steps`
    (the epochs and optimiser steps the operation ran, all of them, before and after a resume).
    """
    i, skip, start = self.oplog.next_op()
    if skip:
      self.last_train_stats, self.last_train_epochs, self.last_train_steps = (
          self.oplog.replayed_train(i))
      return state
    self.last_train_stats = None
    self.last_train_epochs = self.last_train_steps = 0
    c = self.config
    spec, data, nb, n_rows = loops.operation_data(self, t, data, sources)
    if reset_optimizer and start == 0:
      state = self.reset_optimizer(state)
    op = loops.Operation(
        op=i, task=t, phase=phase, epochs=epochs, start=start, data=data, spec=spec, nb=nb,
        n_rows=n_rows, lr=c.learning_rate if lr is None else lr,
        milestones=c.lr_milestones if lr_milestones is None else lr_milestones,
        decay=c.lr_decay if lr_decay is None else lr_decay, aux_lr=aux_lr, aux_lr_fn=aux_lr_fn,
        hook=hook, hook_every=hook_every, epoch_end=epoch_end)
    return loops.run_epochs(self, op, state)

  def apply(self, state: TrainState, fn: Callable[[TrainState], TrainState]) -> TrainState:
    """Applies ``fn`` (a pruning / freezing / release step) as a recorded operation."""
    _, skip, _ = self.oplog.next_op()
    if skip:
      return state
    return fn(state)

  def record(self, state: TrainState, fn: Callable[[TrainState], Any]) -> Any:
    """``fn(state)`` (a JSON-able host value) as a recorded operation: replayed from the log.

    For decisions a method takes on the host from the state (a count, a threshold test): on
    resume the finished operations are skipped and hand back the *restored* (later) state, so
    reading the state again would decide from the wrong weights; the recorded value is the one
    the interrupted run computed.
    """
    i, skip, _ = self.oplog.next_op()
    key = oplog_lib.value_key(i)
    if skip and key in self.oplog.log:
      return self.oplog.log[key]
    value = fn(state)
    self.oplog.log[key] = value
    return value

  def evaluate(self, state: TrainState, t: int, *, split: str = "val",
               current: int | None = None, data: TaskData | None = None) -> float:
    """Accuracy on task ``t`` (a recorded operation: replayed from the log on resume).

    ``current`` is the last task trained (default ``t``): with task-IL, the view and head of task
    ``t``; with class-IL, the view of ``current`` and logits over the classes seen up to it.
    """
    i, skip, _ = self.oplog.next_op()
    key = oplog_lib.eval_key(i)
    if skip and key in self.oplog.log:
      return float(self.oplog.log[key])
    value = self.accuracy(state, t, split=split, current=t if current is None else current,
                          data=data)
    self.oplog.log[key] = value
    return value

  def accuracy(self, state: TrainState, t: int, *, split: str = "test", current: int,
               data: TaskData | None = None, views: bool = False):
    """Accuracy on task ``t`` after training ``current`` (not recorded; used for the matrix).

    With ``views``, the pair ``{"task_aware": a, "task_agnostic": b}`` from the same evaluation
    program (:func:`evaluation.eval_counts`); the run's own view (class-IL: task-agnostic) is the
    number returned without it.
    """
    data = self.task_data(t, split) if data is None else data
    return evaluation.task_accuracy(self._eval_counts, self.class_il, state, data, t, current,
                                    views)

  def accuracy_row(self, state: TrainState, current: int, split: str = "test",
                   views: bool = False) -> list:
    """Accuracy on every task after training ``current`` (one row of the accuracy matrix);
    with ``views``, one ``{"task_aware", "task_agnostic"}`` pair per task."""
    return [self.accuracy(state, j, split=split, current=current, views=views)
            for j in range(self.stream.num_tasks)]
