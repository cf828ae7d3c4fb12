"""DST for CL under its registry name (``config.method = 'dst'``): the settings of ``dst_cl.py``.

The conformance test loads ``configs/<registry name>.py``; this file re-exports
``configs/dst_cl.py`` (same presets and modifiers), e.g.::

  python experiments/main.py --config=configs/dst.py:runlocal --workdir=/tmp/dst_small
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "configs_dst_cl", os.path.join(os.path.dirname(os.path.abspath(__file__)), "dst_cl.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

get_config = _module.get_config
PRESETS = _module.PRESETS
MODIFIERS = _module.MODIFIERS
