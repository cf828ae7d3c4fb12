"""The config presets, shipped inside the package as ``sparse_cl_jax.configs``.

Each module here is a config file with ``get_config(arg)``; a launcher loads it by path
(``--config=configs/packnet.py:runlocal`` in a checkout) or by name from an installed package
(``--config=packnet:runlocal``, see ``sparse_cl_jax.cli.resolve_config_spec``).
"""
