"""DST for CL under its registry name (``config.method = 'dst'``): the settings of ``dst_cl.py``.

The conformance test loads ``configs/<registry name>.py``; this file re-exports
``configs/dst_cl.py`` (same presets and modifiers), e.g.::

  python experiments/main.py --config=configs/dst.py:runlocal --workdir=/tmp/dst_small
"""

from sparse_cl_jax import config as config_lib

_module = config_lib.sibling_module(__file__, "dst_cl")

get_config = _module.get_config
PRESETS = _module.PRESETS
MODIFIERS = _module.MODIFIERS
