"""The launchers' command line: help, --print_config, overrides (model fields too), one-line errors."""

import os
import subprocess
import sys

import pytest

from sparse_cl_jax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(_REPO, "experiments", "main.py")
PACKNET = os.path.join(_REPO, "configs", "packnet.py")


def launch(*args, timeout=120):
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)


def packnet(arg="runlocal"):
  return cli.load_config_file(f"{PACKNET}:{arg}")


def test_overrides_parse_by_the_fields_type():
  c = packnet()
  cli.apply_overrides(c, [("epochs", "3"), ("learning_rate", "1e-3"), ("progress", None),
                          ("multi_head", "false"), ("hidden", "64,32"), ("lr_milestones", "()"),
                          ("packnet.prune_fraction", "0.75"), ("dataset", "fashion_mnist")])
  assert c.epochs == 3 and c.learning_rate == 1e-3 and c.progress is True
  assert c.multi_head is False and c.hidden == (64, 32) and c.lr_milestones == ()
  assert c.packnet.prune_fraction == 0.75 and c.dataset == "fashion_mnist"
  cli.apply_overrides(c, [("hidden", "(128,)")])
  assert c.hidden == (128,)


@pytest.mark.parametrize("override,match", [
    (("nosuchfield", "1"), r"^no such field: --config.nosuchfield; --help --config=\.\.\. lists"),
    (("epoch", "3"), r"^no such field: --config.epoch; did you mean --config.epochs"),
    (("packnet.prune_fractoin", "0.5"),
     r"^no such field: --config.packnet.prune_fractoin; did you mean --config.packnet.prune_fr"),
    (("epochs", "three"), r"^--config.epochs='three' is not an integer$"),
    (("progress", "maybe"), r"^--config.progress='maybe' is not a boolean; use true or false$"),
    (("packnet", "1"), r"^--config.packnet is a group of fields; set one of them"),
    (("model_kwargs.fc_layer", "true"),
     r"^no such field: --config.model_kwargs.fc_layer: model 'mlp' has no field 'fc_layer'"),
    (("model_kwargs.norm", "batch"), r"set by the harness from config.norm; set --config.norm"),
])
def test_bad_overrides_are_one_line(override, match):
  with pytest.raises(cli.UsageError, match=match) as info:
    cli.apply_overrides(packnet(), [override])
  assert "\n" not in str(info.value)


def test_model_fields_settable_after_the_model_changes():
  c = packnet()
  # model_kwargs.* are applied after every other override, so the order on the line is free.
  cli.apply_overrides(c, [("model_kwargs.fc_layers", "True"), ("model", "vgg16_bn")])
  assert c.model == "vgg16_bn" and c.model_kwargs.fc_layers is True
  defaults = cli.model_defaults("vgg16_bn")
  assert "fc_layers" in defaults and "norm" not in defaults and "num_heads" not in defaults


def test_config_file_errors_are_one_line(tmp_path):
  with pytest.raises(cli.UsageError, match=r"unknown config argument 'nope'") as info:
    cli.load_config_file(f"{PACKNET}:nope")
  assert "\n" not in str(info.value) and "\\n" not in str(info.value)
  with pytest.raises(cli.UsageError, match=r"no such file .*pacnet.py; .* has .*packnet.py"):
    cli.load_config_file(os.path.join(_REPO, "configs", "pacnet.py"))


def test_help_lists_every_field_and_exits_0():
  out = launch("--help", f"--config={PACKNET}:runlocal", "--config.epochs=3")
  assert out.returncode == 0, out.stderr[-2000:]
  c = packnet()
  c.epochs = 3
  for line in cli.config_lines(c):
    assert line in out.stdout  # every field with its (resolved) value
  assert "--config.epochs=3" in out.stdout and "--config.packnet.prune_fraction=0.6" in out.stdout
  for flag in ("--workdir", "--overwrite", "--print_config", "--traceback"):
    assert flag in out.stdout
  assert "Unable to initialize backend" not in out.stderr and "TPU" not in out.stderr


def test_print_config_resolves_model_fields_without_a_workdir():
  out = launch(f"--config={PACKNET}:runlocal", "--config.model_kwargs.fc_layers=True",
               "--config.model=vgg16_bn", "--print_config")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--config.model_kwargs.fc_layers=true" in out.stdout
  assert "--config.model=vgg16_bn" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--config.nosuchfield=1"], "error: no such field: --config.nosuchfield"),
    (["--config.epochs=0"], "error: --config.epochs=0 must be an integer >= 1"),
    (["--workdri=/tmp/x"], "error: Unknown command line flag 'workdri'"),
    (["--config.method=packnett"], "error: --config.method='packnett' is not a method; choose"),
])
def test_usage_errors_exit_2_in_one_line(args, message, tmp_path):
  out = launch(f"--config={PACKNET}:runlocal", f"--workdir={tmp_path}/w", *args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
  assert out.stderr.startswith(message), out.stderr
  assert not os.path.exists(f"{tmp_path}/w")  # nothing ran


def test_run_error_one_line_and_traceback_on_request(tmp_path):
  (tmp_path / "file").write_text("x")
  args = [f"--config={PACKNET}:runlocal", f"--workdir={tmp_path}/file"]
  out = launch(*args)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: workdir ")
  assert "Traceback" not in out.stderr
  out = launch(*args, "--traceback")
  assert out.returncode == 1 and "Traceback" in out.stderr and "is a file" in out.stderr


def test_compare_launcher(tmp_path):
  for name, acc in (("pn", 0.9), ("ft", 0.7)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(
        '{"method": "%s", "config": {"dataset": "digits"}, "accuracy_matrix": [[%s]], "acc": %s, '
        '"bwt": 0.0, "average_accuracy_curve": [%s]}' % (name, acc, acc, acc))
  cmd = [sys.executable, os.path.join(_REPO, "experiments", "compare.py"), str(tmp_path / "pn"),
         str(tmp_path / "ft"), f"--out={tmp_path / 'out'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| pn | pn | digits | 1 | 0.9000 |" in out.stdout
  assert (tmp_path / "out" / "compare.png").stat().st_size > 0
  out = subprocess.run(cmd[:2] + [str(tmp_path)], capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode == 1 and out.stderr.startswith("error: ")
  assert "is not a run directory" in out.stderr
