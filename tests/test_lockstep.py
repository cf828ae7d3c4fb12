"""Lockstep (the engine of sweeps): cells in threads share vmapped programs and end as alone.

* four packnet cells (seed x learning rate) run every program call in one group of four and end
  with the accuracy matrices of the same cells run alone, bit for bit (a dense network: XLA:CPU
  computes the vmapped program exactly as the single one);
* cells declared in one program class whose programs differ (weight decay is a constant of the
  optimiser) are found out by the check of the class's first two cells: they run apart and still
  end as alone;
* a diverging cell stops alone and the other cells finish;
* with four devices the stacked arguments are sharded over a 'run' mesh axis and results go back
  to each cell's device.
"""

import threading

import jax
import numpy as np
import pytest

from sparse_cl_jax import cli
from sparse_cl_jax import experiment
from sparse_cl_jax import reliability
from sparse_cl_jax.train import lockstep as lockstep_lib

def _config(name="packnet", **fields):
  c = cli.load_config_file(f"{name}:runlocal")
  c.progress = False
  c.num_tasks = 2
  c.epochs = 1
  c.packnet.retrain_epochs = 1
  for k, v in fields.items():
    c[k] = v
  return c


def _sweep(cells: dict, tmp_path, classes=None, mesh=None):
  ls = lockstep_lib.Lockstep(mesh=mesh)
  for name in cells:
    ls.join(name, program_class=(classes or {}).get(name, "all"))
  out = {}

  def work(name):
    try:
      out[name] = experiment.run(cells[name], str(tmp_path / name), print_summary=False,
                                 lockstep=ls, cell=name)
    except BaseException as e:  # pylint: disable=broad-except
      out[name] = e
    finally:
      ls.leave(name)

  threads = [threading.Thread(target=work, args=(n,)) for n in cells]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out, ls


def _alone(config, path):
  return experiment.run(config, str(path), print_summary=False)


def test_four_cells_share_every_program_and_end_as_alone(tmp_path):
  cells = {f"s{s}_lr{m}": _config(seed=s, learning_rate=0.05 * m) for s in (0, 1) for m in (1, 2)}
  out, ls = _sweep(cells, tmp_path)
  report = ls.report()
  for name, config in cells.items():
    assert not isinstance(out[name], BaseException), out[name]
    alone = _alone(config, tmp_path / f"alone_{name}")
    np.testing.assert_array_equal(np.asarray(out[name]["accuracy_matrix"]),
                                  np.asarray(alone["accuracy_matrix"]))
    assert out[name]["density_per_task"] == alone["density_per_task"]
    assert report[name]["largest_group"] == 4
    assert report[name]["batched_calls"] == report[name]["calls"] > 0
    assert set(report[name]["shared_with"]) == set(cells) - {name}
  assert ls.split_classes() == []
  # The cells' own trace counts are those of a run alone (the class check's lowering is not one).
  assert out["s1_lr2"]["trace_counts"].get("run_steps", 0) <= 1


def test_a_class_whose_programs_differ_is_split_and_still_ends_as_alone(tmp_path):
  cells = {"wd0": _config(weight_decay=1e-4), "wd1": _config(weight_decay=1e-3)}
  out, ls = _sweep(cells, tmp_path)
  assert ls.split_classes() == ["all"]
  report = ls.report()
  for name, config in cells.items():
    # The training steps run apart; the evaluation passes (no optimiser in them) still share.
    assert 0 < report[name]["batched_calls"] < report[name]["calls"]
    np.testing.assert_array_equal(np.asarray(out[name]["accuracy_matrix"]),
                                  np.asarray(_alone(config, tmp_path / f"a_{name}")["accuracy_matrix"]))


def test_a_diverging_cell_stops_alone(tmp_path):
  cells = {"ok": _config(learning_rate=0.05),
           "bad": _config(learning_rate=1e6, divergence_threshold=10.0)}
  out, _ = _sweep(cells, tmp_path)
  assert isinstance(out["bad"], reliability.DivergenceError)
  assert not isinstance(out["ok"], BaseException)
  assert len(out["ok"]["accuracy_matrix"]) == 2


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (emulated) devices")
def test_run_axis_sharded_over_four_devices(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("run",))
  cells = {f"s{s}": _config(seed=s) for s in range(4)}
  out, ls = _sweep(cells, tmp_path, mesh=mesh)
  for name, config in cells.items():
    assert ls.report()[name]["largest_group"] == 4
    np.testing.assert_array_equal(np.asarray(out[name]["accuracy_matrix"]),
                                  np.asarray(_alone(config, tmp_path / f"a_{name}")["accuracy_matrix"]))
