"""The harness's multi-source step, per-example statistics, early stops and eval outputs.

* ``Trainer.train(..., sources=...)`` with one ``'epoch'`` source and a plain cross-entropy
  ``step_loss`` is the classic step: bit-identical params (same order, same augmentation).
* ``'cycle'`` sources restart their epoch order when exhausted; their rows are all valid.
* ``Method.after_step`` sees every valid training example exactly once per epoch (classic step).
* ``epoch_end`` stops an operation early; the epochs and steps it ran are replayed on resume.
* ``Trainer.outputs`` gives the logits the accuracy is computed from, and the head's input.
* Multi-source steps compile once for a whole run of same-shaped sources.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_cl_jax import data
from sparse_cl_jax import experiment
from sparse_cl_jax import train

import test_padding


def _source(seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(4), 13)
  x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[::2], y[::2])


def _config(**overrides):
  # test_padding's tiny convnet stream config with plain BatchNorm.
  return test_padding._config("batch", **overrides)  # pylint: disable=protected-access


def _plain_ce(fwd, params, aux, mstate, batch_stats, batches, task):
  del aux, mstate
  b = batches["main"]
  logits, stats = fwd(params, batch_stats, b["x"], b["valid"], task)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
  w = b["valid"].astype(jnp.float32)
  loss = jnp.sum(jnp.where(b["valid"], ce, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
  correct = jnp.sum(jnp.where(b["valid"], jnp.argmax(logits, -1) == b["y"], False))
  return loss, (stats, jnp.stack([loss * jnp.sum(w), correct.astype(jnp.float32), jnp.sum(w)]),
                {})


def _with(trainer, **fields):
  trainer.method = dataclasses.replace(trainer.method, **fields)
  return trainer


def test_one_epoch_source_with_plain_cross_entropy_is_the_classic_step():
  classic = experiment.build(_config(), source=_source())
  state = classic.init_state()
  classic.begin_task(0)
  state = classic.train(state, 0, epochs=2)
  want = jax.device_get((state.params, state.batch_stats))
  want_stats = classic.last_train_stats

  multi = _with(experiment.build(_config(), source=_source()), step_loss=_plain_ce)
  state = multi.init_state()
  multi.begin_task(0)
  src = train.Source(multi.task_data(0), batch_size=8, order="epoch")
  state = multi.train(state, 0, epochs=2, sources={"main": src})
  got = jax.device_get((state.params, state.batch_stats))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert multi.last_train_stats.accuracy == want_stats.accuracy
  assert multi.last_train_stats.loss == pytest.approx(want_stats.loss, rel=1e-6)
  n = int(multi.task_data(0).n)
  assert multi.last_train_epochs == 2 and multi.last_train_steps == 2 * (-(-n // 8))


def test_cycle_sources_restart_their_order_and_one_compile_serves_every_call():
  seen = []

  def loss(fwd, params, aux, mstate, batch_stats, batches, task):
    out = _plain_ce(fwd, params, aux, mstate, batch_stats, batches, task)
    side = batches["side"]
    logits, _ = fwd(params, batch_stats, side["x"], side["valid"], task)
    extra = 0.0 * jnp.sum(logits)  # differentiable, changes nothing
    return out[0] + extra, (out[1][0], out[1][1], {"side_ids": side["ids"],
                                                   "side_valid": side["valid"]})

  def after_step(mstate, outputs, task):
    del task
    jax.debug.callback(lambda i, v: seen.append((np.asarray(i), np.asarray(v))),
                       outputs["side_ids"], outputs["side_valid"], ordered=True)
    return mstate

  trainer = _with(experiment.build(_config(augment="none"), source=_source()), step_loss=loss,
                  after_step=after_step)
  state = trainer.init_state()
  trainer.begin_task(0)
  main = trainer.task_data(0)
  n_main = int(main.n)
  side_x = np.zeros((6, 8, 8, 3), np.uint8)
  side_ids = np.array([10, 11, 12, 13, 14, 15], np.int32)
  side = {"x": side_x, "ids": side_ids, "n": np.int32(3)}  # rows 3..5 are never drawn
  state = trainer.train(state, 0, epochs=1, sources={
      "main": train.Source(main, 8, "epoch"), "side": train.Source(side, 5, "cycle")})
  steps = -(-n_main // 8)
  assert len(seen) == steps
  drawn = np.concatenate([ids for ids, _ in seen])
  assert all(v.all() for _, v in seen)
  assert set(drawn.tolist()) == {10, 11, 12}
  # One epoch order of 3 rows, repeated: positions p and p + 3 hold the same row.
  np.testing.assert_array_equal(drawn[3:], drawn[:len(drawn) - 3])
  assert sorted(drawn[:3].tolist()) == [10, 11, 12]

  # Same shapes, another task and another number of valid side rows: no new trace.
  side2 = {"x": side_x, "ids": side_ids, "n": np.int32(6)}
  trainer.begin_task(1)
  state = trainer.train(state, 1, epochs=1, sources={
      "main": train.Source(trainer.task_data(1), 8, "epoch"),
      "side": train.Source(side2, 5, "cycle")})
  key = "run_multi_steps" if trainer.loop == "device" else "host_multi_step"
  assert trainer.trace_counts[key] == 1


def test_after_step_sees_every_valid_example_once_per_epoch_in_the_classic_step():
  n_ids = 200

  def init_state(ctx):
    del ctx
    return {"count": jnp.zeros(n_ids, jnp.int32), "right": jnp.zeros(n_ids, jnp.int32)}

  def after_step(mstate, outputs, task):
    del task
    ids = jnp.where(outputs["valid"], outputs["ids"], n_ids)  # out of range: dropped
    return {"count": mstate["count"].at[ids].add(1, mode="drop"),
            "right": mstate["right"].at[ids].add(outputs["correct"].astype(jnp.int32),
                                                 mode="drop")}

  trainer = _with(experiment.build(_config(), source=_source()), init_state=init_state,
                  after_step=after_step)
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=3)
  d = trainer.task_data(0)
  ids = np.asarray(d.ids)[:int(d.n)]
  count = np.asarray(state.method["count"])
  assert (count[ids] == 3).all() and count.sum() == 3 * len(ids)
  right = np.asarray(state.method["right"])
  # The running accuracy of the epochs is what the per-example record says.
  assert 0 < right.sum() <= count.sum()


def test_epoch_end_stops_early_and_a_replay_restores_the_counts():
  trainer = experiment.build(_config(augment="none"), source=_source())
  state = trainer.init_state()
  trainer.begin_task(0)
  calls = []

  def epoch_end(st, epoch):
    calls.append(epoch)
    return st, epoch == 2

  state = trainer.train(state, 0, epochs=10, epoch_end=epoch_end)
  nb = -(-int(trainer.task_data(0).n) // 8)
  assert calls == [0, 1, 2]
  assert (trainer.last_train_epochs, trainer.last_train_steps) == (3, 3 * nb)
  log = dict(trainer._op_log)  # pylint: disable=protected-access
  trainer.resume = train.Resume(task=0, op=1, epoch=0, op_log=log)
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=10, epoch_end=epoch_end)  # replayed: skipped
  assert calls == [0, 1, 2]
  assert (trainer.last_train_epochs, trainer.last_train_steps) == (3, 3 * nb)


def test_outputs_are_the_logits_of_the_accuracy_and_the_heads_input():
  trainer = experiment.build(_config(), source=_source())
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=1)
  test = trainer.task_data(0, "test")
  out = trainer.outputs(state, test, view_task=0, features=True)
  n = int(test.n)
  logits, feats = np.asarray(out["logits"])[:n], np.asarray(out["features"])[:n]
  acc = float(np.mean(np.argmax(logits, -1) == np.asarray(test.y)[:n]))
  assert acc == pytest.approx(trainer.accuracy(state, 0, split="test", current=0), abs=1e-7)
  # The head is a linear map of the features: logits = features @ kernel[0] + bias[0].
  head = jax.device_get(state.params["head"])
  np.testing.assert_allclose(feats @ head["kernel"][0] + head["bias"][0], logits, rtol=1e-4,
                             atol=1e-4)
  assert feats.shape == (n, head["kernel"].shape[1])


def test_bad_sources_are_refused_with_the_reason():
  trainer = experiment.build(_config(), source=_source())
  state = trainer.init_state()
  trainer.begin_task(0)
  d = trainer.task_data(0)
  with pytest.raises(ValueError, match="exactly one source must have order='epoch'"):
    trainer.train(state, 0, epochs=1, sources={"a": train.Source(d, 8, "cycle")})
  with pytest.raises(ValueError, match="order='shuffle'"):
    trainer.train(state, 0, epochs=1, sources={"a": train.Source(d, 8, "shuffle")})
  with pytest.raises(ValueError, match="no 'n'"):
    trainer.train(state, 0, epochs=1, sources={"a": train.Source({"x": d.x}, 8, "epoch")})


def test_record_replays_the_value_the_interrupted_run_computed():
  trainer = experiment.build(_config(augment="none"), source=_source())
  state = trainer.init_state()
  trainer.begin_task(0)
  before = trainer.record(state, lambda st: float(np.abs(np.asarray(
      st.params["head"]["kernel"])).sum()))
  state = trainer.train(state, 0, epochs=1)
  after = trainer.record(state, lambda st: float(np.abs(np.asarray(
      st.params["head"]["kernel"])).sum()))
  assert before != after
  log = dict(trainer._op_log)  # pylint: disable=protected-access
  # Replay from the trained state: the first value comes back from the log, not from the state.
  trainer.resume = train.Resume(task=0, op=3, epoch=0, op_log=log)
  trainer.begin_task(0)
  assert trainer.record(state, lambda st: -1.0) == before
  state = trainer.train(state, 0, epochs=1)
  assert trainer.record(state, lambda st: -1.0) == after


def test_a_source_may_hold_arrays_of_the_donated_state():
  # The method keeps its memory in its state and trains on it as a source: the state is donated
  # to every step, so the source must not share its buffers.
  def init_state(ctx):
    del ctx
    return {"memory": jnp.asarray(np.arange(12, dtype=np.int32))}

  trainer = _with(experiment.build(_config(augment="none"), source=_source()),
                  init_state=init_state, step_loss=_plain_ce)
  state = trainer.init_state()
  trainer.begin_task(0)
  d = trainer.task_data(0)
  memory = {"x": d.x[:12], "y": d.y[:12], "mem": state.method["memory"], "n": np.int32(12)}
  state = trainer.train(state, 0, epochs=2, sources={"main": train.Source(memory, 4, "epoch")})
  np.testing.assert_array_equal(np.asarray(state.method["memory"]), np.arange(12))
