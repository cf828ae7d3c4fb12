"""Training augmentation on the device (issue 11 item 1): crop with zero padding, flip, replay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_cl_jax import augment
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import data
from sparse_cl_jax import experiment
from sparse_cl_jax import train


def _images(n, h=8, w=8, c=3, seed=0):
  # 1..255: a 0 in the output can only come from the zero padding.
  return np.random.default_rng(seed).integers(1, 256, (n, h, w, c), dtype=np.uint8)


def test_random_crop_is_a_window_of_the_zero_padded_image():
  x = _images(400)
  p = 2
  out = np.asarray(jax.jit(augment.random_crop, static_argnums=2)(jax.random.key(1), x, p))
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  seen = set()
  for i in range(len(x)):
    hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert len(hits) == 1, i  # exactly one window (the images have no zeros of their own)
    seen.add(hits[0])
  assert len(seen) == (2 * p + 1) ** 2  # every offset 0..2p in both axes occurs


def test_random_flip_mirrors_about_half_of_the_batch():
  x = _images(400)
  out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(2), x))
  flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)])
  same = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
  assert np.all(flipped ^ same)
  assert 0.4 < flipped.mean() < 0.6


def test_apply_modes_keys_and_identity():
  x = jnp.asarray(_images(64))
  key = jax.random.key(3)
  f = jax.jit(augment.apply, static_argnums=0, static_argnames="padding")
  assert augment.apply("none", key, x) is x
  np.testing.assert_array_equal(f("crop", key, x, padding=0), x)  # nothing to crop from
  a = np.asarray(f("crop_flip", key, x, padding=4))
  np.testing.assert_array_equal(a, f("crop_flip", key, x, padding=4))  # same key, same batch
  assert not np.array_equal(a, f("crop_flip", jax.random.key(4), x, padding=4))
  assert (a == 0).any()  # zero padding came in
  flips = np.asarray(f("flip", key, x, padding=4))
  assert not (flips == 0).any()  # a flip alone never pads


@pytest.mark.parametrize("field,value,match", [
    ("augment", "rotate", r"config.augment='rotate' is not valid; choose one of"),
    ("augment_padding", -1, r"config.augment_padding=-1 must be an integer >= 0"),
    ("image_size", -3, r"config.image_size=-3 must be an integer >= 0"),
])
def test_bad_augment_config_named(field, value, match):
  c = config_lib.base("finetune")
  c[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)
  with pytest.raises(ValueError, match=r"config.augment_padding=2.5 must be an integer >= 0"):
    augment.check("crop", 2.5)


def _source(n_per_class=12, classes=4, size=8, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(classes), n_per_class)
  x = rng.integers(0, 256, (len(y), size, size, 3), dtype=np.uint8)
  return data.from_arrays(x, y, x[::3], y[::3])


def _config(**overrides):
  c = config_lib.base("finetune")
  c.dataset = "arrays"
  c.num_tasks = 2
  c.model = "mlp"
  c.hidden = (16,)
  c.batch_size = 8
  c.epochs = 2
  c.progress = False
  c.checkpoint_every_epochs = 0
  c.augment = "crop_flip"
  c.augment_padding = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _params_after_training(trainer, epochs=2):
  state = trainer.init_state()
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=epochs)
  return state, jax.device_get(state.params)


def test_the_training_step_augments_every_batch_and_evaluation_never(monkeypatch):
  calls = {"train": 0}
  original = augment.apply

  def counting(*args, **kwargs):
    calls["train"] += 1
    return original(*args, **kwargs)

  monkeypatch.setattr(augment, "apply", counting)
  src = _source()
  trainer = experiment.build(_config(), source=src)
  state = trainer.init_state()
  for t in range(2):
    trainer.accuracy(state, t, current=t)
  assert calls["train"] == 0  # evaluation traced without any augmentation
  trainer.begin_task(0)
  state = trainer.train(state, 0, epochs=2)
  assert calls["train"] == 1  # traced once, inside the jitted step
  trainer.begin_task(1)
  state = trainer.train(state, 1, epochs=1)
  assert calls["train"] == 1  # no retrace for another task / operation / epoch
  assert sum(trainer.trace_counts[k] for k in ("run_steps", "host_step")) == 1
  assert trainer.trace_counts["eval"] == 1

  # The augmentation changes what is trained on, and it is the same on a second run.
  a = _params_after_training(trainer)[1]
  b = _params_after_training(trainer)[1]
  plain = _params_after_training(experiment.build(_config(augment="none"), source=src))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(plain)))


def test_both_epoch_loops_augment_identically():
  src = _source()
  params = {}
  for loop in ("device", "host"):
    trainer = experiment.build(_config(epoch_loop=loop), source=src)
    params[loop] = _params_after_training(trainer)[1]
  for u, v in zip(jax.tree.leaves(params["device"]), jax.tree.leaves(params["host"])):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_a_resumed_training_operation_replays_the_augmentation():
  saved = {}

  def save(state, meta):  # what a checkpoint holds after each epoch
    saved[meta["epoch"]] = (jax.device_get(state), dict(meta))

  trainer = experiment.build(_config(checkpoint_every_epochs=1), source=_source(), save_fn=save)
  full = _params_after_training(trainer, epochs=3)[1]
  state, meta = saved[2]  # interrupted after epoch 2 of 3
  trainer.resume = train.Resume(task=0, op=meta["op"], epoch=meta["epoch"],
                                op_log=meta["op_log"])
  trainer.begin_task(0)
  state = trainer.train(trainer.put(state), 0, epochs=3)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), full)


def test_image_size_resizes_both_splits_once():
  src = _source(size=12)
  small = data.resize_source(src, 6)
  assert small.x_train.shape[1:] == (6, 6, 3) and small.x_test.shape[1:] == (6, 6, 3)
  assert small.x_train.dtype == np.uint8
  # A constant image stays constant; a resize to the same size is the identity.
  flat = data.from_arrays(np.full((2, 12, 12, 3), 77, np.uint8), [0, 1],
                          np.full((2, 12, 12, 3), 9, np.uint8), [0, 1])
  np.testing.assert_array_equal(data.resize_source(flat, 4).x_train, 77)
  assert data.resize_source(src, 12) is src
  stream = experiment.build_stream(_config(image_size=6), src)
  assert stream.input_shape == (6, 6, 3)
