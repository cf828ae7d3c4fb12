"""One continual-learning run from a config: build, train every task, evaluate, checkpoint, report.

Layer 5 of the design; the launcher ``experiments/main.py`` calls :func:`run` and nothing else.

``run(config, workdir)`` builds the task stream, the model and the method, then for each task
calls the method's ``run_task`` through a :class:`sparse_cl_jax.train.Trainer` and evaluates every
task on the test split (the full accuracy matrix, upper triangle included). After every task, and
every ``config.checkpoint_every_epochs`` epochs inside one, the complete state is checkpointed
with orbax; running again with the same ``workdir`` resumes where it stopped and ends with the
same results. A workdir holding checkpoints of another config is refused, naming the differing
fields (an attempt that ended before its first checkpoint binds nothing: a rerun may change any
field); a finished run is never overwritten unless ``overwrite=True`` (then it is moved aside, not
deleted). Every training epoch is logged (loss, accuracy, learning rate, density) to
``workdir/metrics.csv`` and TensorBoard event files in ``workdir/tensorboard`` (and to Weights &
Biases when ``config.wandb.mode`` asks: :mod:`sparse_cl_jax.trackers`), and a finished run draws
its plots into ``workdir/plots`` (:mod:`sparse_cl_jax.logs`). The run ends by writing
``workdir/results.json`` and printing a summary table and where each of these files is.

Faults end in one line (:mod:`sparse_cl_jax.reliability`): a second process on the same workdir
is refused at once (:class:`~sparse_cl_jax.reliability.WorkdirInUseError`); a corrupt newest
checkpoint is set aside and the run resumes from the newest valid one; a diverging loss (or a
state with NaN/inf about to be checkpointed) stops the run with
:class:`~sparse_cl_jax.reliability.DivergenceError` before anything of it is saved, naming the
checkpoint a rerun would resume from.

Stopping: while :func:`run` runs in the main thread, SIGTERM (what a cluster sends before it
preempts a job) and SIGINT (Ctrl-C) ask it to stop (:class:`~sparse_cl_jax.reliability.StopSignals`):
the epoch loop finishes the epoch it is in, saves a checkpoint there (a method with
``resumable_within_task=False`` keeps its newest one), and :func:`run` prints one line on stderr
(where it saved, and that rerunning the same command resumes) and raises
:class:`~sparse_cl_jax.reliability.RunInterrupted`, a ``SystemExit`` with status 143 (SIGTERM) or
130 (SIGINT). A second signal ends the process at once. A write that fails for a reason of the
storage (full disk, quota, read-only file system, I/O error) ends the run with
:class:`~sparse_cl_jax.reliability.StorageError`: one line naming the path, the cause and the
checkpoint that is intact; a failed checkpoint leaves nothing a rerun could take for a step.

Example::

  from sparse_cl_jax import config as config_lib, experiment
  c = config_lib.base("packnet"); c.packnet = ...  # or: configs/packnet.py get_config()
  results = experiment.run(c, "/tmp/packnet")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sparse_cl_jax import checkpoint
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data as data_lib
from sparse_cl_jax import distributed
from sparse_cl_jax import logs
from sparse_cl_jax import masks
from sparse_cl_jax import methods
from sparse_cl_jax import metrics
from sparse_cl_jax import models
from sparse_cl_jax import reliability
from sparse_cl_jax import runtime
from sparse_cl_jax import trackers as trackers_lib
from sparse_cl_jax import train
from sparse_cl_jax.methods import base

# Fields that may change between a run and its resumption.
_NOT_FINGERPRINTED = ("progress", "checkpoint_every_epochs", "epoch_loop", "compilation_cache")
# The divergence threshold only decides whether a run stops: raising it lets a stopped run resume.
_NOT_FINGERPRINTED += ("divergence_threshold",)
# Where the run is logged besides its workdir (W&B) changes nothing it computes.
_NOT_FINGERPRINTED += ("wandb",)

# Model fields the harness sets: from the config's own fields or from the task stream.
MANAGED_MODEL_FIELDS = frozenset({"num_heads", "num_classes", "num_tasks", "norm",
                                  "width_multiplier", "hidden"})


def managed_field_message(name: str, flag: str = "config") -> str:
  """Why ``model_kwargs.<name>`` cannot be set, and what to set instead."""
  if name in ("norm", "width_multiplier", "hidden"):
    return (f"{flag}.model_kwargs.{name} is set by the harness from {flag}.{name}; set "
            f"--{flag}.{name}=... instead")
  return (f"{flag}.model_kwargs.{name} is set by the harness from the task stream "
          "(config.num_tasks, config.dataset, config.incremental, config.multi_head)")


def check_names(config) -> None:
  """ValueError if ``config.method`` / ``config.model`` / a ``model_kwargs`` key is not known."""
  if config.method not in methods.REGISTRY:
    raise ValueError(f"config.method={config.method!r} is not a method; choose one of "
                     f"{sorted(methods.REGISTRY)}")
  if config.model not in models.MODEL_NAMES:
    raise ValueError(f"config.model={config.model!r} is not a model; choose one of "
                     f"{list(models.MODEL_NAMES)}")
  check_model_kwargs(config)


def check_model_kwargs(config) -> dict:
  """``config.model_kwargs`` as a dict; ValueError naming a key the model does not have."""
  extra = dict(config.get("model_kwargs") or {})
  fields = models.model_fields(config.model)
  for k in extra:
    if k in MANAGED_MODEL_FIELDS:
      raise ValueError(managed_field_message(k))
    if k not in fields:
      raise ValueError(f"config.model_kwargs.{k}: model {config.model!r} has no field {k!r}; "
                       f"its fields are {sorted(fields - MANAGED_MODEL_FIELDS)}")
  return extra


def build_stream(config, source: data_lib.Source | None = None) -> data_lib.TaskStream:
  """The task stream the config describes (``source`` overrides the dataset for 'arrays')."""
  if source is None:
    if config.dataset == "arrays":
      raise ValueError("config.dataset='arrays' is for the Python API only (experiment.run(config, "
                       "workdir, source=data.Source(...))); on the command line choose one of "
                       f"{[d for d in config_lib.DATASETS if d != 'arrays']}")
    source = data_lib.load_source(config.dataset, data_dir=config.data_dir or None,
                                  seed=config.seed)
  if config.get("image_size", 0):
    source = data_lib.resize_source(source, int(config.image_size))
  try:
    return data_lib.make_stream(
        source, scenario=config.scenario, num_tasks=config.num_tasks,
        incremental=config.incremental, class_order=config_lib.class_order(config),
        val_fraction=config.val_fraction, seed=config.seed,
        max_train_per_task=config.max_train_per_task or None,
        max_eval_per_task=config.max_eval_per_task or None)
  except ValueError as e:
    m = re.match(r"num_tasks=(\d+) does not divide the (\d+) classes", str(e))
    if m is None:
      raise
    n, classes = int(m.group(1)), int(m.group(2))
    divisors = [d for d in range(1, classes + 1) if classes % d == 0]
    raise ValueError(f"config.num_tasks={n} does not divide the {classes} classes of "
                     f"config.dataset={config.dataset!r} (split scenario: every task gets the "
                     f"same number of classes); choose num_tasks from {divisors}") from None


def build_model(config, stream: data_lib.TaskStream):
  """The Flax model for the stream: heads for every task (task-IL) or one shared head."""
  multi = stream.incremental == "task" and bool(config.multi_head)
  num_heads = stream.num_tasks if multi else 1
  kwargs: dict[str, Any] = {"width_multiplier": config.width_multiplier,
                            "num_tasks": stream.num_tasks}
  if config.model == "mlp":
    kwargs["hidden"] = tuple(config.hidden)
  norm = config.norm
  if norm == "auto":
    natural = models.create(config.model, num_heads=1, num_classes=2).norm
    norm = "none" if natural == "none" else methods.default_norm(config.method)
  kwargs["norm"] = norm
  kwargs.update(check_model_kwargs(config))
  # A method that reads several heads off the same features (LLT's main and auxiliary heads)
  # asks for OUTPUT_COPIES times the stream's outputs.
  copies = int(getattr(methods.module(config.method), "OUTPUT_COPIES", 1))
  return models.create(config.model, num_heads=num_heads,
                       num_classes=stream.num_outputs * copies, **kwargs)


def build(config, *, source=None, save_fn=None, lockstep=None, cell=None):
  """Stream, model, context, method and trainer for a config (no training).

  ``lockstep`` / ``cell``: the run is cell ``cell`` of a sweep (:mod:`sparse_cl_jax.sweep`).
  """
  config_lib.validate(config)
  runtime.enable_compilation_cache(config.get("compilation_cache") or None)
  stream = build_stream(config, source)
  model = build_model(config, stream)
  key = jax.random.key(config.seed)
  variables = models.init(model, jax.random.fold_in(key, 1), (1,) + tuple(stream.input_shape))
  params = variables["params"]
  include = tuple(config.get("mask_include", masks.DEFAULT_INCLUDE))
  exclude = tuple(config.get("mask_exclude", masks.DEFAULT_EXCLUDE))
  spec = masks.maskable(params, include=include, exclude=exclude)
  rows = base.task_rows(params, stream.num_tasks, multi_head=model.num_heads > 1,
                        per_task_norm=getattr(model, "norm", "none") == "task_batch")
  ctx = base.Context(config=config, model=model, stream=stream, variables=variables, spec=spec,
                     task_rows=rows, num_tasks=stream.num_tasks,
                     key=jax.random.key_data(jax.random.fold_in(key, 2)))
  method = methods.make(config.method, config, ctx)
  trainer = train.Trainer(config=config, model=model, stream=stream, method=method, ctx=ctx,
                          save_fn=save_fn, lockstep=lockstep, cell=cell)
  return trainer


def upper_triangle(method: str) -> str:
  """What the method's accuracy matrix holds above the diagonal (``metrics.UPPER_TRIANGLES``)."""
  return getattr(methods.module(method), "UPPER_TRIANGLE", "gem")


def _report(trainer: train.Trainer, state: train.TrainState, R, R_val, b,
            train_seconds: float, R_views=None) -> dict:
  ctx = trainer.ctx
  rep = dict(trainer.method.report(ctx, state))
  own = rep.pop("ownership", None)
  mask_bits = int(rep.pop("mask_bits", 0))
  params = jax.device_get(state.params)
  out = {
      "method": trainer.method.name,
      "config": config_lib.to_dict(trainer.config),
      "accuracy_matrix": R.tolist(),
      "val_accuracy_matrix": R_val.tolist(),
      "random_init_accuracy": list(b),
      "acc": metrics.acc(R),
      "bwt": metrics.bwt(R),
      "fwt": metrics.forward_transfer(R, np.asarray(b),
                                      upper_triangle=upper_triangle(trainer.config.method)),
      "forgetting": metrics.forgetting(R),
      "average_accuracy_curve": metrics.average_accuracy_curve(R).tolist(),
      # Both accuracy views (docs/guide.md); ``accuracy_matrix`` is the scenario's own one.
      **({} if R_views is None else {
          v: metrics.view_metrics(R_views[i]) for i, v in enumerate(metrics.ACCURACY_VIEWS)}),
      "density_per_task": rep.pop("density_per_task", [1.0] * ctx.num_tasks),
      "model_bytes": metrics.model_bytes(
          params, mask_bits=mask_bits, maskable=ctx.spec,
          per_task_trees=[jax.device_get(state.batch_stats)]),
      "train_seconds": train_seconds,
      "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
      "devices": _devices(trainer),
      "tasks": [list(map(int, c)) for c in trainer.stream.classes],
  }
  if own is not None:
    own_np = jax.device_get(own)
    spec_leaves = jax.tree.leaves(ctx.spec)
    maskable_own = {p: o for (p, o), s in zip(masks.leaves_with_paths(own_np), spec_leaves) if s}
    out["capacity_per_layer"] = metrics.capacity_per_layer(maskable_own, ctx.num_tasks)
    out["capacity_total"] = metrics.capacity_total(maskable_own, ctx.num_tasks)
  out.update(rep)  # method-specific extras
  return out


def _devices(trainer: train.Trainer) -> list[str]:
  """The devices the run computed on (every process's, for a multi-process run)."""
  if trainer.mesh is not None:
    return [str(d) for d in trainer.mesh.devices.flat]
  if trainer.replicated is not None:
    return [str(d) for d in trainer.replicated.mesh.devices.flat]
  return [str(jax.local_devices()[0])]


def run(config, workdir: str, *, source: data_lib.Source | None = None,
        stop_after_task: int | None = None, overwrite: bool = False,
        print_summary: bool = True, lockstep=None, cell: str | None = None) -> dict | None:
  """Runs (or resumes) the experiment; returns the results dict, or None if stopped early.

  Args:
    config: an ml_collections config (see ``configs/``).
    workdir: checkpoints, ``run.json`` and ``results.json`` go here.
    source: data for ``config.dataset='arrays'`` (a ``data.Source``).
    stop_after_task: stop (after checkpointing) once this many tasks are done; for splitting long
      runs and for tests of resumption.
    overwrite: move a finished run in ``workdir`` aside and start again.
    print_summary: print the accuracy matrix table at the end.
    lockstep / cell: run as cell ``cell`` of a sweep, sharing compiled programs through
      ``lockstep`` (:class:`sparse_cl_jax.train.lockstep.Lockstep`).

  Raises:
    reliability.RunInterrupted: SIGTERM or SIGINT stopped the run after it saved where it was (a
      ``SystemExit``, status 143 / 130; called in the main thread, its line is printed on stderr).
    reliability.StorageError: a write failed for a reason of the storage; one line.
    reliability.FaultError: the other faults (divergence, a workdir in use, no valid checkpoint).
  """
  config_lib.validate(config)
  if not distributed.is_primary() and config.progress:  # process 0 shows the progress
    config = config.copy_and_resolve_references()
    config.progress = False
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a folder; pass a folder (it is created if "
                     "missing) as --workdir")
  # Before the workdir is touched: a tracker that cannot work (wandb not installed) stops here.
  extra_trackers = trackers_lib.from_config(config)
  fingerprint = {k: v for k, v in config_lib.to_dict(config).items()
                 if k not in _NOT_FINGERPRINTED}
  # SIGTERM / SIGINT: saved at the next epoch end (main thread only; a sweep installs its own).
  with reliability.StopSignals() as signals, reliability.quiet_storage_faults_in_threads():
    # Refuses at once if another process has the workdir open; released however the run ends.
    ckpt = checkpoint.Checkpointer(workdir, fingerprint=fingerprint, overwrite=overwrite)
    try:
      return _run_and_close(config, workdir, ckpt, source=source, lockstep=lockstep, cell=cell,
                            stop_after_task=stop_after_task, print_summary=print_summary,
                            extra_trackers=extra_trackers)
    except reliability.RunInterrupted as e:
      if signals.installed:  # this run owns the signals: the one line is its to print
        print(e.message, file=sys.stderr, flush=True)
      raise


def _run_and_close(config, workdir: str, ckpt: checkpoint.Checkpointer, **kwargs) -> dict | None:
  """:func:`run` with the workdir open: faults in one line, the checkpointer closed at the end."""
  saved: dict = {}
  quiet = logs.logs_above_progress_bars() if config.progress else contextlib.nullcontext()
  failed = True
  try:
    with quiet:
      results = _run_open(config, workdir, ckpt, saved, **kwargs)
    failed = False
    return results
  except reliability.DivergenceError as e:
    if saved:
      where = _describe_position(saved["meta"])
      note = (f"the newest checkpoint, step {saved['step']} ({where}), is intact and a rerun "
              "resumes from it")
    else:
      note = ("no checkpoint was written (so a rerun in the same workdir may change any config "
              "field)")
    raise e.with_context(note) from None
  except reliability.RunInterrupted as e:
    raise _interrupted(e, saved, ckpt) from None
  except Exception as e:  # pylint: disable=broad-except  # re-raised unless a storage fault
    fault = reliability.storage_error(e, workdir, codes=reliability.WRITE_ONLY_ERRNOS)
    if fault is None:
      raise
    checkpoint_write = fault.what.startswith("cannot write checkpoint")
    raise fault.with_context(_intact(saved, "previous" if checkpoint_write else "newest")) from (
        None if isinstance(e, reliability.StorageError) else e)
  finally:
    try:
      ckpt.close()
    except Exception:  # pylint: disable=broad-except  # the run's own error comes first
      if not failed:
        raise


def _intact(saved: dict, which: str = "newest") -> str:
  """What a run that stops now leaves to resume from, in words."""
  if not saved:
    return "no checkpoint was written yet"
  return (f"the {which} checkpoint, step {saved['step']} ({_describe_position(saved['meta'])}), "
          "is intact")


def _interrupted(e: reliability.RunInterrupted, saved: dict,
                 ckpt: checkpoint.Checkpointer) -> reliability.RunInterrupted:
  """``e`` with its one line: where the run was saved, and that a rerun resumes.

  ``e.message``, when the run saved nothing on the way out, says why (the epoch loop's
  :func:`sparse_cl_jax.train.loops.stop_here`).
  """
  name, folder = e.signal_name, str(ckpt.checkpoint_dir)
  where = _describe_position(saved["meta"]) if saved else ""
  if e.saved:
    message = (f"stopped by {name}: saved checkpoint step {saved['step']} ({where}) in {folder}; "
               "rerunning the same command resumes from it")
  else:
    why = e.message or "nothing to save yet"
    if saved:
      message = (f"stopped by {name}: {why}; the newest checkpoint, step {saved['step']} "
                 f"({where}) in {folder}, is intact and rerunning the same command resumes from "
                 "it")
    else:
      message = (f"stopped by {name}: {why}; no checkpoint was written yet, so rerunning the same "
                 "command starts afresh")
  return reliability.RunInterrupted(e.signum, message, step=saved.get("step"), saved=e.saved,
                                    where=where, checkpoint_dir=folder)


def _describe_position(meta: dict) -> str:
  if int(meta.get("op", 0)) or int(meta.get("epoch", 0)):
    return f"task {int(meta['task']) + 1}, operation {meta['op']}, after epoch {meta['epoch']}"
  return f"after task {meta['task']}"


def _run_open(config, workdir: str, ckpt: checkpoint.Checkpointer, saved: dict, *, source,
              stop_after_task, print_summary, lockstep=None, cell=None,
              extra_trackers=()) -> dict | None:
  """:func:`run` with the workdir open; ``saved``: step and meta of the newest checkpoint.

  ``extra_trackers``: started with the run log (after CSV and TensorBoard), closed with it.
  """
  progress: dict = {}
  run_log: list[logs.RunLog] = []  # set once the starting point is known

  def save(state, meta):
    host = jax.device_get(state)
    bad = reliability.first_nonfinite(masks.leaves_with_paths(host))
    if bad is not None:
      raise reliability.DivergenceError(
          f"training diverged: the state to checkpoint at {_describe_position(meta)} holds NaN or "
          f"inf in {bad}; not saved", reliability.NONFINITE_ADVICE)
    step = (ckpt.latest_step() or 0) + 1
    meta = {**progress, **meta, "logged_epochs": run_log[0].index if run_log else 0}
    ckpt.save(step, host, meta)
    saved.update(step=step, meta=meta)

  trainer = build(config, source=source, save_fn=save, lockstep=lockstep, cell=cell)
  T = trainer.stream.num_tasks
  state = trainer.init_state()
  R = np.full((T, T), np.nan)
  R_val = np.full((T, T), np.nan)
  R_views = np.full((len(metrics.ACCURACY_VIEWS), T, T), np.nan)  # task-aware, task-agnostic
  start_task = 0
  train_seconds = 0.0
  like = jax.eval_shape(lambda s: s, state)
  if trainer.replicated is not None:
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=trainer.replicated), like)
  # Corrupt steps are set aside with a one-line warning; none valid at all is refused.
  found = ckpt.restore_newest_valid(like=like)
  if found is not None:
    latest, state, meta = found
    # Placed exactly as a fresh state is (trainer.put): restored arrays come back committed to a
    # device, and the jitted steps and method functions would all compile again for that.
    state = trainer.put(jax.device_get(state))
    saved.update(step=latest, meta=meta)
    R = np.array(meta["R"], dtype=float)
    R_val = np.array(meta["R_val"], dtype=float)
    if "R_views" in meta:  # a checkpoint from before both views were kept: NaN rows
      R_views = np.array(meta["R_views"], dtype=float)
    b = list(meta["b"])
    train_seconds = float(meta["train_seconds"])
    start_task = int(meta["task"])
    if int(meta.get("op", 0)) or int(meta.get("epoch", 0)):
      trainer.resume = train.Resume(task=start_task, op=int(meta["op"]),
                                    epoch=int(meta["epoch"]), op_log=dict(meta["op_log"]))
    logging.info("resuming %s from step %d at task %d (op %s, epoch %s)", workdir, latest,
                 start_task + 1, meta.get("op"), meta.get("epoch"))
  else:
    b = [trainer.accuracy(state, j, current=j) for j in range(T)]
  run_log.append(logs.RunLog(
      workdir, resume_index=None if found is None else int(found[2].get("logged_epochs", 0)),
      config=config_lib.to_dict(config), trackers=extra_trackers,
      write=distributed.is_primary()))
  failed = True
  try:
    trainer.on_epoch = EpochLogger(trainer, run_log[0])
    results = _train_tasks(config, workdir, ckpt, trainer, state, save, progress, run_log[0],
                           start_task=start_task, R=R, R_val=R_val, b=b, R_views=R_views,
                           train_seconds=train_seconds, stop_after_task=stop_after_task,
                           print_summary=print_summary)
    failed = False
    return results
  finally:
    try:
      run_log[0].close()
    except Exception:  # pylint: disable=broad-except
      # A full disk fails the close too: the first write that failed is the error to report.
      if not failed:
        raise


def _train_tasks(config, workdir, ckpt, trainer, state, save, progress, run_log, *, start_task,
                 R, R_val, b, train_seconds, stop_after_task, print_summary, R_views):
  """The task loop of :func:`run` from ``start_task``; results at the end, None if stopped."""
  T = trainer.stream.num_tasks
  for t in range(start_task, T):
    progress.update(R=R.tolist(), R_val=R_val.tolist(), b=b, train_seconds=train_seconds,
                    R_views=R_views.tolist())
    trainer.begin_task(t)
    t0 = time.perf_counter()
    state = trainer.method.run_task(trainer, state, t)
    jax.block_until_ready(state)
    train_seconds += time.perf_counter() - t0
    both = trainer.accuracy_row(state, t, "test", views=True)
    R_views[:, t] = [[a[v] for a in both] for v in metrics.ACCURACY_VIEWS]
    R[t] = R_views[int(trainer.class_il)][t]  # the scenario's own view
    R_val[t] = trainer.accuracy_row(state, t, "val")
    logging.info("after task %d: test accuracy %s", t + 1, np.round(R[t], 4).tolist())
    run_log.task_end(t, R[t].tolist(), float(np.nanmean(R[t, :t + 1])))
    progress.update(R=R.tolist(), R_val=R_val.tolist(), b=b, train_seconds=train_seconds,
                    R_views=R_views.tolist())
    save(state, {"task": t + 1, "op": 0, "epoch": 0, "op_log": {}})
    signum = reliability.stop_agreed(trainer.scope)
    if signum is not None and t + 1 < T:  # asked to stop (SIGTERM / SIGINT): this save is it
      raise reliability.RunInterrupted(signum, saved=True)
    if stop_after_task is not None and t + 1 >= stop_after_task and t + 1 < T:
      return None
  results = _report(trainer, state, R, R_val, b, train_seconds, R_views)
  results["trace_counts"] = dict(trainer.trace_counts)
  # The plots first: results.json marks the run finished, so a run that cannot write its plots
  # (a full disk) is not finished and its rerun resumes from the last checkpoint and writes both.
  primary = distributed.is_primary()  # process 0 writes a multi-process run's files
  plots = logs.write_run_plots(workdir, results) if primary else []
  results_path = ckpt.finish(results)
  run_log.finish(results)
  if print_summary and primary:
    print(f"\n{results['method']} on {config.dataset} ({config.scenario}, {T} tasks, "
          f"{config.incremental}-IL, model {config.model}): test accuracy matrix R[i, j]")
    print(metrics.summary_table(R, b=np.asarray(b), upper_triangle=upper_triangle(config.method)))
    print("both accuracy views: " + "; ".join(
        f"{v.replace('_', '-')} ACC {results[v]['acc']:.4f} BWT {results[v]['bwt']:.4f}"
        for v in metrics.ACCURACY_VIEWS))
    print(f"density per task: {np.round(results['density_per_task'], 4).tolist()}  "
          f"model bytes: {results['model_bytes']['total']}  "
          f"train seconds: {train_seconds:.1f}")
    print(where_everything_is(workdir, results_path, run_log, plots))
  return results


def where_everything_is(workdir, results_path, run_log: logs.RunLog, plots) -> str:
  """The closing lines of a run: the path of each file it wrote."""
  rows = [("results", str(results_path)),
          *run_log.where(),  # CSV, TensorBoard, then any other tracker's (W&B)
          ("plots", ", ".join(str(p) for p in plots)),
          ("checkpoints", str(os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)))]
  if run_log.moved_to is not None:
    rows.append(("logs of an attempt without checkpoints", str(run_log.moved_to)))
  width = max(len(k) for k, _ in rows)
  return "\n".join([f"run directory {os.path.abspath(workdir)}:"] +
                   [f"  {k:<{width}}  {v}" for k, v in rows])


class EpochLogger:
  """``Trainer.on_epoch`` of a run: one :class:`logs.RunLog` row per epoch, honest progress ETA.

  The density is the fraction of nonzero maskable weights in the network the task trains with
  (``method.forward_params`` of the task), computed on the device by one small jitted function.
  """

  def __init__(self, trainer: train.Trainer, run_log: logs.RunLog):
    self.run_log = run_log
    self._bar = None
    spec = jax.tree.leaves(trainer.ctx.spec)
    forward = trainer.method.forward_params

    def density(params, aux, mstate, task):
      view = jax.tree.leaves(forward(params, aux, mstate, task, task))
      if len(view) != len(spec):
        return jnp.float32(jnp.nan)
      nonzero = sum(jnp.count_nonzero(p) for p, s in zip(view, spec) if s)
      total = sum(int(np.size(p)) for p, s in zip(view, spec) if s)
      return jnp.asarray(nonzero, jnp.float32) / max(total, 1)

    self._density = jax.jit(density)

  def __call__(self, trainer, state, *, task, phase, op, epoch, epochs, loss, accuracy,
               learning_rate, bar=None) -> None:
    del trainer
    dens = float(self._density(state.params, state.aux, state.method, jnp.int32(task)))
    self.run_log.epoch(task=task, phase=phase, operation=op, epoch=epoch, epochs=epochs,
                       loss=float(loss), accuracy=float(accuracy),
                       learning_rate=float(learning_rate), density=dens)
    if bar is not None and bar is not self._bar:  # the first epoch of this bar: compilation
      self._bar = bar
      logs.exclude_first_epoch_from_rate(bar)


def load_results(workdir: str) -> dict:
  """Reads ``workdir/results.json``."""
  with open(f"{workdir}/results.json") as f:
    return json.load(f)
