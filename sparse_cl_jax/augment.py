"""Training-time image augmentation on the device, inside the jitted training step.

The protocol of every CIFAR / ImageNet experiment of the papers reimplemented here (CPG
``utils/cifar100_dataset.py``, DST-for-CL ``utils.py:get_transform``, PrAC and Lifelong Lottery
Tickets): a random crop of the original size from the image zero-padded by 4 pixels on every
side (``torchvision.transforms.RandomCrop(32, padding=4)``), then a horizontal flip with
probability 1/2 (``RandomHorizontalFlip()``). Nothing is ever augmented at evaluation.

The functions work on the raw ``uint8`` images of a batch, before the per-channel normalisation,
so the padding is black (0), as torchvision pads a PIL image before ``ToTensor``/``Normalize``.
Every example draws its own crop offset and flip from the one key of the batch; the trainer
derives that key from (seed, task, operation, epoch, batch), so a resumed run replays the same
augmentations (:class:`sparse_cl_jax.train.Trainer`, config fields ``augment`` and
``augment_padding``).

Example::

  key = jax.random.key(0)
  images = augment.apply('crop_flip', key, images_uint8, padding=4)  # same shape and dtype
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_cl_jax import types

# 'crop_flip': random crop with zero padding, then horizontal flip (the papers' CIFAR protocol);
# 'crop' / 'flip': one of the two; 'none': no augmentation.
AUGMENTS = ('none', 'crop_flip', 'crop', 'flip')


def check(name: str, padding: int) -> None:
  """Raises ``ValueError`` naming ``config.augment`` / ``config.augment_padding`` if invalid."""
  if name not in AUGMENTS:
    raise ValueError(f'config.augment={name!r} is not valid; choose one of {list(AUGMENTS)}')
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ValueError(f'config.augment_padding={padding!r} must be an integer >= 0 (pixels of '
                     'zero padding on each side before the random crop; 4 for 32x32 CIFAR)')


def random_crop(key: types.PRNGKey, images: jax.Array, padding: int) -> jax.Array:
  """Per example: zero-pad by ``padding`` pixels on each side, crop a random window of the size.

  Args:
    key: PRNG key of the batch.
    images: ``[B, H, W, C]`` (any dtype; the padding is 0).
    padding: pixels added on each side (static). 0 returns ``images`` unchanged.

  Returns:
    ``[B, H, W, C]``: example ``b`` is the window at offset ``(dy_b, dx_b)``, each uniform in
    ``0..2 * padding``, of its padded image (offset ``(padding, padding)`` is the original).
  """
  if padding == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1, dtype=jnp.int32)
  zero = jnp.zeros((), jnp.int32)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], zero), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(key: types.PRNGKey, images: jax.Array) -> jax.Array:
  """Per example, mirrors the width axis with probability 1/2 (``[B, H, W, C]`` in and out)."""
  flip = jax.random.bernoulli(key, 0.5, images.shape[:1])
  return jnp.where(flip.reshape((-1, 1, 1, 1)), images[:, :, ::-1, :], images)


def apply(name: str, key: types.PRNGKey, images: jax.Array, *, padding: int = 4) -> jax.Array:
  """The augmentation ``name`` (one of :data:`AUGMENTS`) of a batch of images; jit-compatible.

  Args:
    name: ``'none'``, ``'crop_flip'``, ``'crop'`` or ``'flip'`` (static).
    key: PRNG key of the batch (split into a crop key and a flip key).
    images: ``[B, H, W, C]``, normally the raw ``uint8`` images.
    padding: zero padding of the random crop, pixels per side (static).

  Returns:
    The augmented batch, same shape and dtype.
  """
  check(name, padding)
  if name == 'none':
    return images
  if images.ndim != 4:
    raise ValueError(f'augment {name!r} needs images [B, H, W, C], got shape {images.shape}')
  crop_key, flip_key = jax.random.split(key)
  if name in ('crop_flip', 'crop'):
    images = random_crop(crop_key, images, padding)
  if name in ('crop_flip', 'flip'):
    images = random_flip(flip_key, images)
  return images
