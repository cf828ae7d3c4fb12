"""Sweeps: the grid and its refusals, cells in lockstep equal to runs alone, resume, faults."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from sparse_cl_jax import cli
from sparse_cl_jax import experiment
from sparse_cl_jax import sweep

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(_REPO, "experiments", "sweep.py")
PACKNET = os.path.join(_REPO, "configs", "packnet.py")
GRID = {"seed": [0, 1], "learning_rate": [0.05, 0.1]}


def base():
  c = cli.load_config_file(f"{PACKNET}:runlocal")
  c.epochs = 1
  c.progress = False
  return c


def launch(*args, timeout=120):
  return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)


def matrices(record):
  return {c["name"]: experiment.load_results(c["workdir"])["accuracy_matrix"]
          for c in record["cells"]}


# --------------------------------------------------------------------------------------------------
# The grid by hand.


def test_cell_names():
  assert sweep.cell_names([{"seed": 0, "learning_rate": 0.01}]) == ["seed-0_learning_rate-0.01"]
  assert sweep.cell_names([{}]) == ["base"]
  assert sweep.cell_names([{"hidden": (64, 64), "lr_milestones": (), "multi_head": False,
                            "dst.sparsity": 1e-06}]) == [
                                "hidden-64,64_lr_milestones-empty_multi_head-false_"
                                "dst.sparsity-1e-06"]
  # Unsafe characters become '-'; a name that then repeats another gets -2, -3 ...
  assert sweep.cell_names([{"data": "a/b"}, {"data": "a b"}, {"data": "a-b"}]) == [
      "data-a-b", "data-a-b-2", "data-a-b-3"]
  long = sweep.cell_names([{"class_order": ",".join(map(str, range(100)))}])[0]
  assert len(long) <= 190 and long.startswith("class_order-0,1,2")


def test_values_parse_by_the_fields_type():
  c = base()
  assert cli.sweep_values(c, "seed", "0,1,2") == [0, 1, 2]
  assert cli.sweep_values(c, "learning_rate", "0.1, 1e-3") == [0.1, 1e-3]
  assert cli.sweep_values(c, "multi_head", "true,false") == [True, False]
  assert cli.sweep_values(c, "packnet.prune_fraction", "0.5,0.75") == [0.5, 0.75]
  # A tuple-valued field separates its values with ';' (an empty tuple is '()').
  assert cli.sweep_values(c, "hidden", "64,64;128") == [(64, 64), (128,)]
  assert cli.sweep_values(c, "lr_milestones", "();0.5,0.8") == [(), (0.5, 0.8)]
  assert cli.sweep_values(c, "class_order", "natural;4,3,2,1,0") == ["natural", "4,3,2,1,0"]


def test_program_classes_ignore_only_the_data_fields(monkeypatch):
  cells = sweep.plan(base(), {"seed": [0, 1], "learning_rate": [0.05, 0.1],
                              "hidden": [(32,), (16,)]})
  by_hidden = {}
  for c in cells:
    by_hidden.setdefault(c.overrides["hidden"], set()).add(c.program)
  assert [len(p) for p in by_hidden.values()] == [1, 1]  # seed and learning rate: one class
  assert by_hidden[(32,)] != by_hidden[(16,)]
  monkeypatch.setattr(sweep, "DATA_FIELDS", sweep.DATA_FIELDS + ("packnet.prune_fraction",))
  cells = sweep.plan(base(), {"packnet.prune_fraction": [0.5, 0.75]})
  assert cells[0].program == cells[1].program


# --------------------------------------------------------------------------------------------------
# Refusals: one line, nothing written.


@pytest.mark.parametrize("grid,match", [
    ({"seedd": [0, 1]}, r"^no such field: sweep.seedd; did you mean sweep.seed\?$"),
    ({"packnet.prune_fractoin": [0.5]}, r"did you mean sweep.packnet.prune_fraction\?"),
    ({"seed": []}, r"^sweep.seed has no values"),
    ({"dataset": ["digits", ""]}, r"^sweep.dataset has an empty value"),
    ({"seed": [0, "1"]}, r"^sweep.seed='1' has type str; the field's value 0 has type int$"),
    ({"learning_rate": [0.1, 0.1]}, r"^sweep.learning_rate lists the value 0.1 twice"),
    ({"method": ["packnet", "finetune"]}, r"^sweep.method cannot vary .*one sweep per config"),
    ({"progress": [True, False]}, r"^sweep.progress cannot vary"),
    ({"compilation_cache": ["none", ""]}, r"^sweep.compilation_cache cannot vary"),
    ({"num_devices": [1, 2]}, r"^sweep.num_devices cannot vary .*one device"),
    ({"data_dir": ["/a", "/b"]}, r"^sweep.data_dir cannot vary"),
    ({"packnet": [1]}, r"^sweep.packnet is a group of fields"),
    ({"seed": [0], "learning_rate": [0.1, -1.0]},
     r"^cell seed-0_learning_rate--1.0: sweep.learning_rate=-1.0 must be a number > 0$"),
])
def test_bad_grids_are_refused_before_anything_runs(tmp_path, grid, match):
  with pytest.raises(sweep.GridError, match=match) as info:
    sweep.run(base(), grid, tmp_path / "w")
  assert "\n" not in str(info.value)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("given,match", [
    ([("seed", "0"), ("seed", "1")], r"^--sweep.seed is given twice; list every value in one"),
    ([("seed", "")], r"^--sweep.seed needs values"),
    ([("seed", "0,,1")], r"^--sweep.seed='0,,1' has an empty value"),
    ([("seed", "0,a")], r"^--sweep.seed='a' is not an integer$"),
    ([("hidden", "64;")], r"^--sweep.hidden='64;' has an empty value .*an empty tuple is \(\)"),
    ([("sed", "0")], r"^no such field: --sweep.sed; did you mean --sweep.seed\?"),
])
def test_bad_sweep_flags_are_usage_errors(given, match):
  flag = cli.SweepFlag("sweep", types.SimpleNamespace(name="config", value=base()), "")
  flag.given.extend(given)
  with pytest.raises(cli.UsageError, match=match) as info:
    flag.resolve()
  assert "\n" not in str(info.value)


def test_launcher_refuses_in_one_line_with_exit_2(tmp_path):
  workdir = tmp_path / "w"
  common = [f"--config={PACKNET}:runlocal", f"--workdir={workdir}"]
  out = launch(*common, "--sweep.learning_rat=0.1,0.2")
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "error: no such field: --sweep.learning_rat; did you mean --sweep.learning_rate?")
  out = launch(*common, "--sweep.seed=0,1", "--sweep.method=packnet,finetune")
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: --sweep.method cannot vary in a sweep")
  assert not workdir.exists()


# --------------------------------------------------------------------------------------------------
# Running.


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """The 2x2 sweep (seed x learning rate) of PackNet runlocal, uninterrupted."""
  workdir = tmp_path_factory.mktemp("sweep") / "w"
  return sweep.run(base(), GRID, workdir, command=["test"], print_summary=False), workdir


def test_cells_share_programs_and_equal_runs_alone(swept, tmp_path):
  record, workdir = swept
  assert record["status"] == "done" and record["split_programs"] == []
  names = [c["name"] for c in record["cells"]]
  assert names == ["seed-0_learning_rate-0.05", "seed-0_learning_rate-0.1",
                   "seed-1_learning_rate-0.05", "seed-1_learning_rate-0.1"]
  assert json.loads((workdir / "sweep.json").read_text()) == record
  assert record["grid"] == GRID and record["command"] == ["test"]
  for c in record["cells"]:
    assert c["status"] == "done" and c["error"] is None
    assert c["largest_group"] == 4 and c["batched_calls"] == c["calls"] > 0
    assert c["shared_with"] == sorted(set(names) - {c["name"]})
    assert c["cells_in_program"] == 4 and c["program"] == record["cells"][0]["program"]
    assert c["workdir"] == str((workdir / c["name"]).resolve())
    for f in ("results.json", "metrics.csv", "run.json", "plots", "tensorboard", "checkpoints"):
      assert os.path.exists(os.path.join(c["workdir"], f)), f
  got = matrices(record)
  for c in record["cells"]:  # the same cell run alone, bit for bit
    config = base()
    config.seed, config.learning_rate = c["overrides"]["seed"], c["overrides"]["learning_rate"]
    alone = experiment.run(config, str(tmp_path / c["name"]), print_summary=False)
    assert np.array_equal(np.array(alone["accuracy_matrix"]), np.array(got[c["name"]])), c["name"]
    assert alone["acc"] == c["acc"] and alone["bwt"] == c["bwt"]
  summary = (workdir / "summary.md").read_text()
  assert summary.splitlines()[0] == (
      "| learning_rate | n | ACC | BWT | ACC aware | ACC agnostic | BWT aware | BWT agnostic |")
  assert summary.splitlines()[2].startswith("| 0.05 | 2 | ")
  for f in ("compare.md", "compare.csv", "compare.png"):
    assert (workdir / f).exists()


def test_an_interrupted_sweep_resumes_to_the_same_results(swept, tmp_path, monkeypatch):
  record, _ = swept
  workdir = tmp_path / "w"
  stopped = sweep.run(base(), GRID, workdir, stop_after_task=2, print_summary=False)
  assert stopped["status"] == "pending"
  assert {c["status"] for c in stopped["cells"]} == {"pending"}
  resumed = sweep.run(base(), GRID, workdir, print_summary=False)
  assert resumed["status"] == "done"
  assert matrices(resumed) == matrices(record)
  assert [c["calls"] for c in resumed["cells"]] == [c["calls"] for c in record["cells"]]
  # A finished sweep is read back: no cell runs again.
  monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("a done cell ran again"))
  again = sweep.run(base(), GRID, workdir, print_summary=False)
  assert [c["acc"] for c in again["cells"]] == [c["acc"] for c in record["cells"]]
  # Another grid or config in the same workdir: refused in one line unless overwrite.
  with pytest.raises(sweep.WorkdirMismatchError, match=r"grid.seed \[0, 1\] != \[0, 1, 2\]"):
    sweep.run(base(), {**GRID, "seed": [0, 1, 2]}, workdir)
  other = base()
  other.epochs = 2
  with pytest.raises(sweep.WorkdirMismatchError, match=r"base_config.epochs 1 != 2"):
    sweep.run(other, GRID, workdir)
  monkeypatch.undo()
  fresh = sweep.run(base(), {"seed": [0]}, workdir, overwrite=True, print_summary=False)
  assert fresh["status"] == "done" and [c["name"] for c in fresh["cells"]] == ["seed-0"]
  previous = [p for p in workdir.iterdir() if p.name.startswith("previous-")]
  assert len(previous) == 1 and (previous[0] / "sweep.json").exists()


def test_a_diverging_cell_stops_alone(tmp_path):
  config = base()
  config.divergence_threshold = 100.0
  workdir = tmp_path / "w"
  match = r"1 of 2 cells did not finish: learning_rate-1000000.0 diverged"
  with pytest.raises(sweep.SweepIncompleteError, match=match) as info:
    sweep.run(config, {"learning_rate": [0.05, 1e6]}, workdir, print_summary=False)
  assert "\n" not in str(info.value)
  record = json.loads((workdir / "sweep.json").read_text())
  assert record["status"] == "incomplete"
  ok, bad = record["cells"]
  assert ok["status"] == "done" and ok["acc"] > 0.5
  assert bad["status"] == "diverged" and "diverged" in bad["error"] and "\n" not in bad["error"]
  assert (workdir / "summary.md").exists() and (workdir / "compare.csv").exists()
  assert "1 diverged" in (workdir / "summary.md").read_text()


def test_a_failing_cell_is_failed_with_one_line(tmp_path, monkeypatch):
  real_run = experiment.run

  def run(config, workdir, **kwargs):
    if config.seed == 1:
      raise RuntimeError("boom\nsecond line")
    return real_run(config, workdir, **kwargs)

  monkeypatch.setattr(experiment, "run", run)
  with pytest.raises(sweep.SweepIncompleteError, match=r"seed-1 failed"):
    sweep.run(base(), {"seed": [0, 1]}, tmp_path / "w", print_summary=False)
  record = json.loads((tmp_path / "w" / "sweep.json").read_text())
  ok, bad = record["cells"]
  assert ok["status"] == "done"
  assert bad["status"] == "failed" and bad["error"] == "RuntimeError: boom; second line"
  assert "Traceback" in bad["traceback"]


def test_summary_is_mean_and_sample_sd_over_seeds():
  record = {"grid": {"seed": [0, 1, 2], "lr": [0.1]}, "cells": [
      {"overrides": {"seed": s, "lr": 0.1}, "status": "done", "acc": a, "bwt": 0.0}
      for s, a in ((0, 0.5), (1, 0.7), (2, 0.9))]}
  assert sweep.summary_table(record).splitlines()[2] == (
      "| 0.1 | 3 | 0.7000 ± 0.2000 | 0.0000 ± 0.0000 |")


def test_max_parallel_runs_cells_in_waves(swept, tmp_path):
  record, _ = swept
  waves = sweep.run(base(), {"seed": [0, 1]}, tmp_path / "w", max_parallel=1,
                    print_summary=False)
  assert [c["largest_group"] for c in waves["cells"]] == [1, 1]  # one cell per wave: alone
  assert [c["batched_calls"] for c in waves["cells"]] == [0, 0]
  want = matrices(record)  # learning_rate 0.05 is the base config's
  assert list(matrices(waves).values()) == [want["seed-0_learning_rate-0.05"],
                                            want["seed-1_learning_rate-0.05"]]
