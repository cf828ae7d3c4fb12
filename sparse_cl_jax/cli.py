"""The launchers' command line: config files, ``--config.FIELD=VALUE`` overrides, help and errors.

The last layer of the design: only the launchers, ``experiments/*.py`` and ``python -m
sparse_cl_jax`` (``sparse_cl_jax/__main__.py``), import it (it defines absl flags).
A launcher defines its flags, a config flag with :func:`define_config`, and hands its ``main`` to
:func:`run`::

  _CONFIG = cli.define_config("config", None, "configs/<method>.py[:<preset>]")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")

  def main(argv):
    experiment.run(_CONFIG.value, _WORKDIR.value)

  if __name__ == "__main__":
    cli.run(main, required=("config", "workdir"))

What :func:`run` adds to ``absl.app.run``:

* ``--config=FILE[:ARG]`` loads ``FILE``'s ``get_config(ARG)``; ``--config=NAME[:ARG]`` that of the
  packaged preset ``NAME`` (``packnet:runlocal``: an installed wheel ships every file of
  ``configs/`` as ``sparse_cl_jax.configs``; an unknown name is refused listing the presets).
  ``--config.a.b=VALUE`` (or ``--config.a.b VALUE``; ``--config.flag`` / ``--noconfig.flag`` for
  booleans) sets an existing field, parsed by the type of its current value (tuples as ``64,64``
  or ``'(64, 64)'``). A field that does not exist is refused as "no such field" with the closest
  names.
  ``--config.model_kwargs.NAME=VALUE`` sets any field of the config's model (checked against
  ``models.model_fields``, parsed by the type of the model's default), after all other overrides,
  so it follows a ``--config.model=...`` given anywhere on the line.
* ``--sweep.FIELD=V1,V2,...`` (a launcher that calls :func:`define_sweep`): the values of a grid
  over any field of the config, parsed like ``--config.FIELD`` overrides; a tuple-valued field
  (or a value with commas in it) separates its values with ``;`` (``--sweep.hidden='64,64;128'``).
* ``--help`` (exit status 0) lists the launcher's flags and, with ``--config``, every config field
  with its value and every settable model field with its default.
* ``--print_config`` prints the resolved, validated config as flags and exits.
* Errors are one line on stderr, ``error: ...``: usage errors (unknown flags or fields, bad
  values, a config that fails validation) exit with status 2 before anything runs; errors of the
  run itself (faults, refused workdirs, missing data) with status 1. ``--traceback`` shows the full
  traceback instead.
* JAX's INFO line about backends that are not installed (e.g. TPU) is not shown.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import logging as py_logging
import os
import re
import shlex
import sys
import traceback
from collections import abc
from typing import Any, Callable

from absl import app
from absl import flags
import ml_collections

from sparse_cl_jax import checkpoint
from sparse_cl_jax import config as config_lib
from sparse_cl_jax import distributed
from sparse_cl_jax import reliability

FLAGS = flags.FLAGS

_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (after every override, validated) as "
    "--config.FIELD=VALUE lines and exit.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, show the full Python traceback instead of one line.")
# One run over several processes (jax.distributed); see sparse_cl_jax/distributed.py.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 when the run spans several processes "
    "(with --num_processes and --process_id; none of them: one process, or the processes of a "
    "SLURM job, TPU pod slice, Open MPI or Kubernetes job, detected by JAX).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes the run spans (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 ... num_processes-1 (0 writes the run's files).")
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", 300, "Seconds a process waits for every process of the run to join "
    "the coordinator before it stops with an error.", lower_bound=1)

_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")
# Errors a run reports in one line (exit status 1): their messages name the problem and the fix.
RUN_ERRORS = (reliability.FaultError, checkpoint.RunFinishedError, ValueError, OSError)
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
# Loggers whose INFO records say nothing about the run: backends that are not installed (jax
# looks for TPU/GPU plugins on every start and says so), the compilation cache's setup. Their
# warnings still show.
_BACKEND_LOGGERS = ("jax._src.xla_bridge", "jax._src.cloud_tpu_init", "jax._src.compilation_cache",
                    "jax._src.compiler")


class UsageError(Exception):
  """A command-line mistake; ``str(error)`` is one line naming it and the fix (exit status 2)."""


one_line = reliability.one_line


# --------------------------------------------------------------------------------------------------
# Config files and the config flag.


def presets_dir() -> str | None:
  """The folder of the packaged presets, ``sparse_cl_jax.configs`` (None if there is none).

  Installed (wheel or editable), the package ``sparse_cl_jax.configs``; a checkout used without
  installing it, its top-level ``configs/`` folder beside ``sparse_cl_jax/``.
  """
  try:
    found = importlib.util.find_spec("sparse_cl_jax.configs")
  except ImportError:
    found = None
  if found is not None and found.submodule_search_locations:
    return list(found.submodule_search_locations)[0]
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  return checkout if os.path.isfile(os.path.join(checkout, "__init__.py")) else None


def presets() -> dict[str, str]:
  """``{name: path}`` of every packaged preset file (``--config=NAME[:ARG]``), sorted by name."""
  folder = presets_dir()
  if folder is None:
    return {}
  names = sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))
  return {name: os.path.join(folder, f"{name}.py") for name in names}


def resolve_config_spec(spec: str) -> tuple[str, str]:
  """``(path, ARG)`` of ``spec``: ``PATH[:ARG]`` (a config file) or ``NAME[:ARG]`` (a preset).

  A ``spec`` whose part before ``:`` names an existing file, ends in ``.py`` or holds a path
  separator is a file's path; otherwise it is the name of a packaged preset (a module of
  ``sparse_cl_jax.configs``, the checkout's ``configs/``): ``packnet:runlocal`` is
  ``configs/packnet.py:runlocal``. An unknown name is a UsageError listing the presets.
  """
  path, _, arg = spec.partition(":")
  if (os.path.isfile(path) or path.endswith(".py") or os.sep in path or
      (os.altsep is not None and os.altsep in path)):
    return path, arg
  known = presets()
  if path not in known:
    near = difflib.get_close_matches(path, list(known), n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    available = (f"the presets are {', '.join(known)}" if known else
                 "this installation ships no presets")
    raise UsageError(f"--config={spec}: no preset named {path!r}; {hint}{available} "
                     "(or give a config file: PATH.py[:ARG])")
  return known[path], arg


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of ``spec`` = ``PATH[:ARG]`` or ``NAME[:ARG]``; UsageError if it fails.

  ``PATH`` is a config file; ``NAME`` a packaged preset (:func:`resolve_config_spec`).
  """
  path, arg = resolve_config_spec(spec)
  if not os.path.isfile(path):
    near = ""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
      names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
      if names:
        near = f"; {folder} has {', '.join(names)}"
    raise UsageError(f"--config={spec}: no such file {path}{near}")
  name = "config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # the user's file: report it in one line
    raise UsageError(f"--config={spec}: loading {path} failed: {type(e).__name__}: "
                     f"{one_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise UsageError(f"--config={spec}: {path} has no get_config() function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except TypeError as e:
    if arg and "positional argument" in str(e):
      raise UsageError(f"--config={spec}: {path}'s get_config() takes no argument; drop "
                       f"':{arg}'") from e
    raise UsageError(f"--config={spec}: {one_line(e)}") from e
  except ValueError as e:
    raise UsageError(f"--config={spec}: {one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"--config={spec}: get_config() returned a {type(config).__name__}, not an "
                     "ml_collections.ConfigDict")
  return config


class ConfigFlag:
  """The ``--config`` flag of a launcher; :attr:`value` is the resolved ConfigDict."""

  def __init__(self, name: str, default: str | None, help_string: str, module_name: str):
    self.name = name
    self.module_name = module_name  # the launcher module that defined it (its flags are listed)
    self._holder = flags.DEFINE_string(name, default, help_string, module_name=module_name)
    self._value: ml_collections.ConfigDict | None = None
    self.overrides: list[tuple[str, str | None]] = []  # (dotted field, raw value) as given

  @property
  def spec(self) -> str | None:
    """The flag's ``PATH[:ARG]`` (after parsing)."""
    return self._holder.value

  @property
  def value(self) -> ml_collections.ConfigDict:
    if self._value is None:
      raise RuntimeError(f"--{self.name} is read after cli.run has parsed the command line")
    return self._value

  def resolve(self) -> ml_collections.ConfigDict:
    """Loads the file, applies the overrides, validates; UsageError on any problem."""
    if not self.spec:
      raise UsageError(f"--{self.name} is required, e.g. --{self.name}=packnet:runlocal or "
                       f"--{self.name}=configs/packnet.py:runlocal")
    config = load_config_file(self.spec)
    apply_overrides(config, self.overrides, flag=self.name)
    try:
      config_lib.validate(config)
      check_names(config)
    except ValueError as e:
      raise UsageError(_as_flag(one_line(e), self.name)) from e
    self._value = config
    return config


def check_names(config) -> None:
  """ValueError if ``config.method`` / ``config.model`` / a ``model_kwargs`` key is not known."""
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top  # loads JAX
  experiment.check_names(config)


def _caller_module() -> str:
  """absl's name for the module that called our caller (``sys.argv[0]`` for ``__main__``)."""
  name = sys._getframe(2).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return sys.argv[0] if name == "__main__" else name


_CONFIG_FLAGS: list[ConfigFlag] = []


def define_config(name: str = "config", default: str | None = None,
                  help_string: str = "Config file or packaged preset, and its argument: "
                  "PATH.py[:ARG] or NAME[:ARG].") -> ConfigFlag:
  """Defines ``--NAME`` (a config file) and its ``--NAME.FIELD=VALUE`` overrides."""
  flag = ConfigFlag(name, default, help_string, _caller_module())
  _CONFIG_FLAGS.append(flag)
  return flag


class SweepFlag:
  """The ``--NAME.FIELD=V1,V2,...`` flags of a sweep launcher; :attr:`grid` is the parsed grid."""

  def __init__(self, name: str, config: ConfigFlag, help_string: str):
    self.name = name
    self.config = config
    self.help = help_string
    self.given: list[tuple[str, str | None]] = []  # (dotted field, raw values) as given
    self._grid: dict[str, list] | None = None

  @property
  def grid(self) -> dict[str, list]:
    """``{field: [values]}`` in the order given (parsed by the type of each field's value)."""
    if self._grid is None:
      raise RuntimeError(f"--{self.name} is read after cli.run has parsed the command line")
    return self._grid

  def resolve(self) -> dict[str, list]:
    """Parses every flag against the resolved config; UsageError on any problem."""
    grid: dict[str, list] = {}
    for path, text in self.given:
      if path in grid:
        raise UsageError(f"--{self.name}.{path} is given twice; list every value in one flag: "
                         f"--{self.name}.{path}=V1,V2,...")
      grid[path] = sweep_values(self.config.value, path, text, flag=self.name)
    self._grid = grid
    return grid


def sweep_values(config: ml_collections.ConfigDict, path: str, text: str | None, *,
                 flag: str = "sweep") -> list:
  """The values of ``--FLAG.PATH=TEXT``, each parsed by the type of the field's present value.

  Values are separated by ``,``; by ``;`` when the field holds a tuple or ``TEXT`` has a ``;``.
  """
  where = f"--{flag}.{path}"
  if path.startswith("model_kwargs.") and "model_kwargs" in config and path.count(".") == 1:
    name = path.split(".", 1)[1]
    try:
      current = config.model_kwargs.get(name, model_field_default(config, name, flag=flag))
    except UsageError as e:  # a managed field's message names 'FLAG.model_kwargs.NAME'
      raise UsageError(_as_flag(str(e), flag, flag)) from None
  else:
    parts = path.split(".")
    current = config
    for i, part in enumerate(parts):
      if not isinstance(current, ml_collections.ConfigDict) or part not in current:
        raise _no_such_field(path, config, flag, ".".join(parts[:i]) or None)
      current = current[part]
    if isinstance(current, ml_collections.ConfigDict):
      raise UsageError(f"{where} is a group of fields; sweep one of them, e.g. "
                       f"{where}.FIELD=V1,V2")
  if text is None or not text.strip():
    raise UsageError(f"{where} needs values: {where}=V1,V2,...")
  sep = ";" if isinstance(current, (tuple, list)) or ";" in text else ","
  values = []
  for piece in text.split(sep):
    if not piece.strip():
      raise UsageError(f"{where}={text!r} has an empty value (values are separated by {sep!r}"
                       + ("; an empty tuple is ()" if sep == ";" else "") + ")")
    values.append(parse_value(piece.strip(), current, where))
  return values


_SWEEP_FLAGS: list[SweepFlag] = []


def define_sweep(name: str = "sweep", config: ConfigFlag | None = None,
                 help_string: str = "The values of one config field in the grid.") -> SweepFlag:
  """Defines the ``--NAME.FIELD=V1,V2,...`` flags of a grid over the fields of ``config``."""
  if config is None:
    if not _CONFIG_FLAGS:
      raise ValueError("define_sweep needs a config flag: call define_config first")
    config = _CONFIG_FLAGS[0]
  flag = SweepFlag(name, config, help_string)
  _SWEEP_FLAGS.append(flag)
  return flag


# --------------------------------------------------------------------------------------------------
# Overrides.


def _no_such_field(path: str, config, flag: str, group: str | None = None) -> UsageError:
  known = config_lib.field_paths(config)
  if group is not None:
    known = [k for k in known if k.startswith(group + ".")]
  near = config_lib.closest_fields(path, known)
  hint = (f"; did you mean {', '.join(f'--{flag}.{n}' for n in near)}?" if near else
          f"; --help --{flag}=... lists every field")
  return UsageError(f"no such field: --{flag}.{path}{hint}")


def parse_value(text: str | None, current: Any, where: str) -> Any:
  """``text`` parsed as the type of ``current`` (the field's present value or default)."""
  if isinstance(current, bool):
    if text is None:
      return True
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise UsageError(f"{where}={text!r} is not a boolean; use true or false")
  if text is None:
    raise UsageError(f"{where} needs a value: {where}=VALUE")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise UsageError(f"{where}={text!r} is not an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise UsageError(f"{where}={text!r} is not a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    stripped = text.strip()
    if stripped in ("", "()", "[]"):
      return ()
    try:
      value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
      value = [x.strip() for x in stripped.strip("()[]").split(",") if x.strip()]
    if not isinstance(value, (tuple, list)):
      value = [value]
    if current:
      kind = current[0]
      value = [parse_value(str(x) if not isinstance(x, str) else x, kind, where) for x in value]
    return tuple(value)
  if isinstance(current, ml_collections.ConfigDict):
    raise UsageError(f"{where} is a group of fields; set one of them, e.g. {where}.FIELD=VALUE")
  try:  # None or another type: a Python literal, else the text itself
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides, *, flag: str = "config") -> None:
  """Sets ``config``'s fields from ``[(dotted path, raw text or None)]`` (see the module doc).

  ``model_kwargs.NAME`` entries are applied last, checked against the final ``config.model``.
  """
  model_kwargs = []
  for path, text in overrides:
    if path.startswith("model_kwargs.") and "model_kwargs" in config:
      model_kwargs.append((path.split(".", 1)[1], text))
      continue
    parts = path.split(".")
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        group = ".".join(parts[:i]) or None
        raise _no_such_field(path, config, flag, group if i else None)
      if i < len(parts) - 1:
        node = node[part]
    where = f"--{flag}.{path}"
    value = parse_value(text, node[parts[-1]], where)
    try:
      with node.ignore_type() if node[parts[-1]] is None else contextlib.nullcontext():
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise UsageError(f"{where}={text!r}: {one_line(e)}") from e
  for name, text in model_kwargs:
    set_model_field(config, name, text, flag=flag)


def model_defaults(model: str) -> dict[str, Any]:
  """The settable fields of a registered model with their defaults (``model_kwargs`` keys)."""
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top  # loads JAX
  from sparse_cl_jax import models  # pylint: disable=g-import-not-at-top
  instance = models.create(model, num_heads=1, num_classes=2)
  fields = sorted(models.model_fields(model) - experiment.MANAGED_MODEL_FIELDS)
  return {f: getattr(instance, f) for f in fields}


def model_field_default(config, name: str, *, flag: str = "config") -> Any:
  """The default of field ``name`` of ``config.model``; UsageError if it cannot be set."""
  from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
  from sparse_cl_jax import models  # pylint: disable=g-import-not-at-top
  where = f"--{flag}.model_kwargs.{name}"
  if config.model not in models.MODEL_NAMES:
    raise UsageError(f"--{flag}.model={config.model!r} is not a model; choose one of "
                     f"{list(models.MODEL_NAMES)}")
  if name in experiment.MANAGED_MODEL_FIELDS:
    raise UsageError(experiment.managed_field_message(name, flag=flag))
  defaults = model_defaults(config.model)
  if name not in defaults:
    near = difflib.get_close_matches(name, list(defaults), n=3)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    known = (f"its fields are {', '.join(defaults)}" if defaults else
             "it has no fields besides those the harness sets")
    raise UsageError(f"no such field: {where}: model {config.model!r} has no field {name!r}; "
                     f"{hint}{known}")
  return defaults[name]


def set_model_field(config, name: str, text: str | None, *, flag: str = "config") -> None:
  """``config.model_kwargs[name]`` from the command line, checked against the model's fields."""
  where = f"--{flag}.model_kwargs.{name}"
  value = parse_value(text, model_field_default(config, name, flag=flag), where)
  with config.unlocked() if config.is_locked else contextlib.nullcontext():
    with config.model_kwargs.unlocked() if config.model_kwargs.is_locked else contextlib.nullcontext():
      config.model_kwargs[name] = value


def _as_flag(message: str, flag: str, name: str = "config") -> str:
  """'config.x=...' in a validation message read as the flag that sets it."""
  return re.sub(rf"(?<![\w.-]){name}\.", f"--{flag}.", message)


def as_flags(message: str) -> str:
  """A library message naming ``config.FIELD`` / ``sweep.FIELD`` read as the launcher's flags."""
  for cf in _CONFIG_FLAGS[:1]:
    message = _as_flag(message, cf.name)
  for sf in _SWEEP_FLAGS[:1]:
    message = _as_flag(message, sf.name, "sweep")
  return message


# --------------------------------------------------------------------------------------------------
# Printing configs.


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return shlex.quote(repr(tuple(value)))
  if isinstance(value, str):
    return shlex.quote(value)
  return str(value)


def config_lines(config: ml_collections.ConfigDict, flag: str = "config") -> list[str]:
  """``--FLAG.FIELD=VALUE`` for every field (shell-quoted: each line can be pasted back)."""
  lines = []
  for path in config_lib.field_paths(config):
    value = config
    for part in path.split("."):
      value = value[part]
    if isinstance(value, ml_collections.ConfigDict):
      continue  # an empty group (e.g. no model_kwargs set)
    lines.append(f"--{flag}.{path}={_flag_value(value)}")
  return lines


def model_lines(config: ml_collections.ConfigDict, flag: str = "config") -> list[str]:
  """Every settable model field with the value the run will use (set or default)."""
  if "model_kwargs" not in config:
    return []
  try:
    defaults = model_defaults(config.model)
  except ValueError:
    return []
  given = dict(config.model_kwargs)
  return [f"--{flag}.model_kwargs.{k}={_flag_value(given.get(k, v))}"
          + ("" if k in given else "  (default)") for k, v in defaults.items()]


def _flag_help(module_names) -> list[str]:
  out = []
  by_module = FLAGS.flags_by_module_dict()
  for module in module_names:
    for f in sorted(by_module.get(module, []), key=lambda f: f.name):
      value = (",".join(map(str, f.default)) if isinstance(f.default, (list, tuple)) else
               _flag_value(f.default))
      default = "" if f.default is None else f" (default: {value})"
      out.append(f"  --{f.name}: {f.help}{default}")
  return out


def help_text(doc: str | None, specs: abc.Mapping[str, str | None]) -> str:
  """The launcher's docstring, its flags, and the fields of the configs in ``specs``.

  Args:
    doc: the launcher's docstring.
    specs: ``{config flag name: PATH[:ARG] or None}``.
  """
  lines = [(doc or "").strip(), "", "Flags:"]
  # The main script's flags, those of a launcher module it runs (python -m sparse_cl_jax is
  # experiments/main.py's), and ours.
  launchers = [sys.argv[0]] + [cf.module_name for cf in _CONFIG_FLAGS]
  lines += _flag_help(list(dict.fromkeys(launchers + [__name__])))
  lines += [f"  --{sf.name}.FIELD=V1,V2,...: {sf.help}" for sf in _SWEEP_FLAGS]
  lines.append("  --flagfile=FILE: read flags from FILE; --helpfull lists absl's own flags too")
  for cf in _CONFIG_FLAGS:
    spec = specs.get(cf.name)
    if not spec:
      lines += ["", f"Add --{cf.name}=PATH[:ARG] to --help to list every field of that config "
                    "with its value."]
      continue
    config = load_config_file(spec)
    apply_overrides(config, cf.overrides, flag=cf.name)
    lines += ["", f"Fields of --{cf.name}={spec} (set any with --{cf.name}.FIELD=VALUE):"]
    lines += ["  " + line for line in config_lines(config, cf.name)]
    model = model_lines(config, cf.name)
    if model:
      from sparse_cl_jax import experiment  # pylint: disable=g-import-not-at-top
      managed = ", ".join(sorted(experiment.MANAGED_MODEL_FIELDS))
      lines += ["", f"Fields of model {config.model!r} (set with --{cf.name}.model_kwargs.FIELD="
                    f"VALUE; {managed} come from the config and the task stream):"]
      lines += ["  " + line for line in model]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parsing and running.


def _next_value(argv: list[str], i: int) -> tuple[str | None, int]:
  """``--NAME.FIELD VALUE`` (the value as the next argument): (VALUE or None, position used)."""
  nxt = argv[i + 1] if i + 1 < len(argv) else None
  if nxt is not None and not nxt.startswith("-"):
    return nxt, i + 1
  return None, i


def _split_overrides(argv: list[str]) -> list[str]:
  """Moves every ``--NAME.FIELD[=VALUE]`` of a config flag into that flag; returns the rest."""
  names = {cf.name: cf for cf in _CONFIG_FLAGS}
  sweeps = {sf.name: sf for sf in _SWEEP_FLAGS}
  rest = [argv[0]]
  i = 1
  while i < len(argv):
    arg = argv[i]
    m = re.match(r"^--?(no)?([A-Za-z_]\w*)\.([\w.]+)(=(.*))?$", arg, flags=re.S)
    if arg == "--":
      rest.extend(argv[i:])
      break
    if m and m.group(2) in sweeps:
      negated, name, path, has_value, text = m.groups()
      if negated:
        raise UsageError(f"{arg}: a sweep lists its values, e.g. --{name}.{path}=true,false")
      if not has_value:
        text, i = _next_value(argv, i)
      sweeps[name].given.append((path, text))
    elif m and m.group(2) in names:
      negated, name, path, has_value, text = m.groups()
      if negated:
        if has_value:
          raise UsageError(f"{arg}: --no{name}.FIELD takes no value")
        text = "false"
      elif not has_value:
        text, i = _next_value(argv, i)
      names[name].overrides.append((path, text))
    else:
      rest.append(arg)
    i += 1
  return rest


def _find_flag_value(argv: list[str], name: str) -> str | None:
  value = None
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith((f"--{name}=", f"-{name}=")):
      value = arg.split("=", 1)[1]
  return value


def quiet_backend_logs() -> None:
  """Hides JAX's INFO records about backends and its cache's setup (warnings still show)."""
  for name in _BACKEND_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def _print_and_exit(text: str) -> None:
  """Prints ``text`` and exits 0 (also when stdout is a pipe closed early, e.g. by ``head``)."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
  sys.exit(0)


def _usage_exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _make_parser(doc: str | None, required: abc.Sequence[str], positional: bool):

  def parse(argv: list[str]) -> list[str]:
    try:
      try:
        argv = FLAGS.read_flags_from_files(list(argv), force_gnu=False)
      except flags.Error as e:  # e.g. a --flagfile that cannot be read
        raise UsageError(one_line(e)) from e
      for cf in _CONFIG_FLAGS:
        cf.overrides.clear()
      for sf in _SWEEP_FLAGS:
        sf.given.clear()
      rest = _split_overrides(argv)
      if any(a in _HELP for a in rest[1:]):
        specs = {cf.name: _find_flag_value(rest, cf.name) or FLAGS[cf.name].default
                 for cf in _CONFIG_FLAGS}
        text = help_text(doc, specs)
        if any(a in ("--helpfull", "-helpfull") for a in rest[1:]):
          text += "\n\nAll flags:\n" + FLAGS.get_help()
        _print_and_exit(text)
      try:
        remaining = FLAGS(rest)
      except flags.Error as e:
        raise UsageError(one_line(e)) from e
      if len(remaining) > 1 and not positional:
        raise UsageError(f"unexpected argument {remaining[1]!r}; flags take the form --name=value")
      for cf in _CONFIG_FLAGS:
        if cf.spec or cf.name in required or cf.overrides:
          cf.resolve()
      for sf in _SWEEP_FLAGS:
        if sf.given and sf.config.spec is None:
          raise UsageError(f"--{sf.name}.FIELD needs --{sf.config.name}=PATH[:ARG]")
        if sf.config.spec:
          sf.resolve()
      if _PRINT_CONFIG.value:
        if not _CONFIG_FLAGS:
          raise UsageError("--print_config: this launcher has no --config")
        _print_and_exit("\n".join(f"# --{cf.name}={cf.spec}\n" + "\n".join(
            config_lines(cf.value, cf.name)) for cf in _CONFIG_FLAGS))
      for name in required:
        if FLAGS[name].value is None:
          raise UsageError(f"--{name} is required")
    except UsageError as e:
      if FLAGS.is_parsed() and _TRACEBACK.value:
        raise
      _usage_exit(str(e))
    return remaining

  return parse


def _guarded_main(main: Callable[[list[str]], Any], argv: list[str]):
  """``main(argv)`` with its errors as one line and an exit status (see :func:`run`)."""
  try:
    return main(argv)
  except UsageError as e:
    if _TRACEBACK.value:
      raise
    _usage_exit(str(e))
  except RUN_ERRORS as e:
    if _TRACEBACK.value:
      raise
    sys.exit(f"error: {one_line(e)}")


def run(main: Callable[[list[str]], Any], *, doc: str | None = None,
        required: abc.Sequence[str] = (), positional: bool = False) -> None:
  """``absl.app.run(main)`` with the command line of the module docstring.

  Args:
    main: the launcher's ``main(argv)``; the errors in :data:`RUN_ERRORS` it raises end the
      program with one line ``error: ...`` and exit status 1, a :class:`UsageError` with status
      2 (``--traceback``: re-raised).
    doc: the text ``--help`` starts with (default: the ``__main__`` module's docstring).
    required: flags that must be given (checked after ``--help`` and ``--print_config``).
    positional: whether ``main`` takes positional arguments (else they are refused).
  """
  quiet_backend_logs()
  if doc is None:
    doc = getattr(sys.modules.get("__main__"), "__doc__", None)

  def guarded(argv):
    try:
      several = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value,
                                       timeout_seconds=_COORDINATOR_TIMEOUT.value)
    except ValueError as e:
      _usage_exit(one_line(e))
    except distributed.DistributedError as e:
      sys.exit(f"error: {one_line(e)}")
    if not several:
      return _guarded_main(main, argv)
    # Several processes: an error stops this process at once (its one line names it), without
    # waiting for the others at JAX's shutdown; a finished run leaves the runtime together.
    try:
      result = _guarded_main(main, argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      line = e.code if isinstance(e.code, str) else None
      if code in (0, 130, 143):  # done, or a signal's stop: every process stops there, saved
        distributed.exit_now(code, line)
      if line and line.startswith("error: "):
        line = distributed.error_line(line[len("error: "):])
      distributed.stop_all(code, line, reason=line or f"it exited with status {code} (its "
                           "error is on its own output)")
    except BaseException as e:  # pylint: disable=broad-except  # a collective lost its peer, ...
      if _TRACEBACK.value:
        traceback.print_exc()
      distributed.stop_all(1, distributed.error_line(one_line(e)))
    distributed.shutdown()
    return result

  app.run(guarded, flags_parser=_make_parser(doc, tuple(required), positional))


