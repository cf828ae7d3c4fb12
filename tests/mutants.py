r"""Mutation testing: does the suite fail when the code is wrong?

  make mutants                                  # every mutant (about 30 minutes on 2 cores)
  .venv/bin/python tests/mutants.py --only=metrics_bwt_sign,topk_ties
  .venv/bin/python tests/mutants.py --list

Each mutant is one realistic single-site bug (a flipped comparison, an off-by-one, a wrong axis,
a dropped term, a swapped argument) in one module of the package. The script copies the checkout
to a temporary folder, applies one mutant at a time there (the checkout is never touched), runs
the test files a developer would run for that code, and counts the mutant as caught when they
fail. It first runs every test-file set once unmutated: a set that fails then is reported and
its mutants are not counted. It prints the kill rate and every survivor; a survivor that is an
equivalent mutant (no observable behaviour changes) carries its reason in ``equivalent`` and is
listed apart. Not part of ``make test`` (it runs the mapped files once per mutant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple[str, ...]  # test files (or file::test ids) a developer runs for this code
  equivalent: str = ""  # the reason, for a mutant that cannot change behaviour


M = Mutant
_PKG = "sparse_cl_jax/"
_T_PRAC, _T_LLT = "tests/test_prac.py::", "tests/test_llt.py::"
MUTANTS: tuple[Mutant, ...] = (
    # --- core: masks, topk, sparsity, criteria, growth, transforms, schedules.
    M("masks_visible_strict", _PKG + "masks.py", "(o >= 1) & (o <= owner)", "(o >= 1) & (o < owner)",
      ("tests/test_masks.py",)),
    M("masks_claim_any_owner", _PKG + "masks.py", "jnp.where(m & (o == 0), jnp.asarray(owner",
      "jnp.where(m, jnp.asarray(owner", ("tests/test_masks.py",)),
    M("topk_ties_take_one_more", _PKG + "topk.py", "taken.append(tie & (rank <= remaining))",
      "taken.append(tie & (rank <= remaining + 1))", ("tests/test_topk.py",)),
    M("topk_nan_ranks_high", _PKG + "topk.py", "x = jnp.where(jnp.isnan(x), -jnp.inf, x)",
      "x = jnp.where(jnp.isnan(x), jnp.inf, x)", ("tests/test_topk.py",)),
    M("sparsity_keep_floor", _PKG + "sparsity.py",
      "return int(np.rint((np.float32(1.0) - s) * np.float32(n)))",
      "return int(np.floor((np.float32(1.0) - s) * np.float32(n)))", ("tests/test_sparsity.py",)),
    M("criteria_magnitude_signed", _PKG + "criteria.py",
      "return jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)",
      "return jax.tree.map(lambda p: p.astype(jnp.float32), params)", ("tests/test_criteria.py",)),
    M("growth_drop_ceil", _PKG + "growth.py",
      "n = jnp.floor(frac * n_drop_able.astype(jnp.float32)).astype(jnp.int32)",
      "n = jnp.ceil(frac * n_drop_able.astype(jnp.float32)).astype(jnp.int32)",
      ("tests/test_growth.py",)),
    M("growth_no_cap_by_candidates", _PKG + "growth.py", "  n = jnp.minimum(n, n_cand)\n", "",
      ("tests/test_growth.py",)),
    M("transforms_freeze_inverted", _PKG + "transforms.py",
      "jnp.where(m, jnp.full_like(u, -0.0), u), \"freeze\"",
      "jnp.where(m, u, jnp.full_like(u, -0.0)), \"freeze\"",
      ("tests/test_transforms.py",)),
    M("transforms_ste_threshold_ge", _PKG + "transforms.py",
      "return (real_mask > threshold).astype(real_mask.dtype)",
      "return (real_mask >= threshold).astype(real_mask.dtype)", ("tests/test_transforms.py",)),
    M("schedules_cubic_square", _PKG + "schedules.py",
      "jnp.float32(s_i - s_f) * (1.0 - frac) ** 3", "jnp.float32(s_i - s_f) * (1.0 - frac) ** 2",
      ("tests/test_schedules.py",)),
    M("schedules_cosine_phase", _PKG + "schedules.py", "(1.0 + jnp.cos(jnp.pi * t))",
      "(1.0 + jnp.cos(0.5 * jnp.pi * t))", ("tests/test_schedules.py",)),
    # --- harness: metrics, augment, models, reliability, train.
    M("metrics_bwt_diagonal", _PKG + "metrics.py", "R[T - 1, j] - R[j, j] for j in range(T - 1)",
      "R[T - 1, j] - R[0, j] for j in range(T - 1)", ("tests/test_metrics.py",)),
    M("metrics_acc_first_row", _PKG + "metrics.py", "return _nanmean(R[-1])",
      "return _nanmean(R[-2])", ("tests/test_metrics.py",)),
    M("augment_flip_height", _PKG + "augment.py", "images[:, :, ::-1, :], images)",
      "images[:, ::-1, :, :], images)", ("tests/test_augment.py",)),
    M("augment_crop_offsets_short", _PKG + "augment.py", "(b, 2), 0, 2 * padding + 1,",
      "(b, 2), 0, 2 * padding,", ("tests/test_augment.py",)),
    M("models_bn_epsilon_outside", _PKG + "models.py", "mul = jax.lax.rsqrt(var + epsilon)",
      "mul = jax.lax.rsqrt(var) + epsilon", ("tests/test_models.py", "tests/test_padding.py")),
    M("reliability_threshold_strict", _PKG + "reliability.py",
      "(threshold <= 0 or loss <= threshold)", "(threshold <= 0 or loss < threshold)",
      ("tests/test_faults.py",)),
    M("train_eval_in_train_mode", _PKG + "train/evaluation.py",
      "state.batch_stats, x, view_task, train=False,", "state.batch_stats, x, view_task, train=True,",
      ("tests/test_trainer.py",)),
    M("train_lr_epoch_index", _PKG + "train/loops.py",
      "optim.lr_for_epoch(op.lr, epoch, op.epochs", "optim.lr_for_epoch(op.lr, epoch + 1, op.epochs",
      ("tests/test_trainer.py",)),
    M("train_padding_weighs", _PKG + "train/steps.py",
      "loss = jnp.sum(jnp.where(real, ce * w, 0.0)) / wsum", "loss = jnp.sum(ce) / wsum",
      ("tests/test_padding.py",)),
    M("train_oplog_skips_the_interrupted_op", _PKG + "train/oplog.py",
      "    if i < r.op:\n      return i, True, 0", "    if i <= r.op:\n      return i, True, 0",
      ("tests/test_trainer.py",)),
    M("train_class_il_mask", _PKG + "train/steps.py",
      "seen = c[\"head_mask\"][head_task]", "seen = c[\"head_mask\"][0]",
      ("tests/test_experiment.py",)),
    # --- data.
    M("data_last_batch_valid", _PKG + "data/batching.py", "positions < n_valid",
      "positions <= n_valid", ("tests/test_data.py",)),
    M("data_num_batches_floor", _PKG + "data/batching.py",
      "return (n_valid + batch_size - 1) // batch_size", "return n_valid // batch_size",
      ("tests/test_data.py",)),
    M("data_herding_running_mean", _PKG + "data/memory.py",
      "(running[None, :] + phi) / j", "(running[None, :] + phi) / (j + 1)",
      ("tests/test_data.py", "tests/test_llt.py")),
    M("data_val_split_keeps_one", _PKG + "data/splits.py",
      "round(fraction * idx.size), 1, max(idx.size - 1, 0)",
      "round(fraction * idx.size), 0, max(idx.size - 1, 0)", ("tests/test_data.py",)),
    # --- checkpoint.
    M("ckpt_unlisted_file_accepted", _PKG + "checkpoint/checksums.py",
      "    if name not in recorded:\n      raise ChecksumError(name, f\"not in {FILE} (added after it "
      "was written)\")", "    if name not in recorded:\n      continue",
      ("tests/test_checkpoint.py",)),
    M("ckpt_digest_not_compared", _PKG + "checkpoint/checksums.py",
      "if digest != recorded[name]:", "if digest is None:", ("tests/test_checkpoint.py",)),
    # --- methods.
    M("packnet_keep_floor", _PKG + "methods/packnet.py",
      "jnp.round((1.0 - fraction) * c).astype(jnp.int32)",
      "jnp.floor((1.0 - fraction) * c).astype(jnp.int32)", ("tests/test_packnet.py",)),
    M("packnet_view_owner_strict", _PKG + "methods/packnet.py",
      "jnp.where(same, o <= owner, (o >= 1) & (o <= owner))",
      "jnp.where(same, o <= owner, (o >= 1) & (o < owner))", ("tests/test_packnet.py",)),
    M("cpg_goal_strict", _PKG + "methods/cpg.py", "return acc >= goal - tolerance",
      "return acc > goal - tolerance", ("tests/test_cpg.py",)),
    M("cpg_train_acc_ge", _PKG + "methods/cpg.py", "return stats.accuracy > min_train_acc",
      "return stats.accuracy >= min_train_acc", ("tests/test_cpg.py",)),
    M("cpg_reserve_off_by_one", _PKG + "methods/cpg.py", "remaining = num_tasks - t - 1",
      "remaining = num_tasks - t", ("tests/test_cpg.py",)),
    M("piggyback_threshold_ge", _PKG + "methods/piggyback.py",
      "live = jax.tree.map(lambda a, s: (a > threshold) if s",
      "live = jax.tree.map(lambda a, s: (a >= threshold) if s", ("tests/test_piggyback.py",)),
    M("individual_bank_row", _PKG + "methods/individual.py",
      "b if r else b.at[t].set(p)", "b if r else b.at[0].set(p)",
      ("tests/test_conformance.py::test_forgetting_promise",)),
    M("clnp_count_ge", _PKG + "methods/clnp.py", "(owner[n] == 0) & (means[n] > theta_vec[i])",
      "(owner[n] == 0) & (means[n] >= theta_vec[i])", ("tests/test_clnp.py",)),
    M("dst_schedule_total", _PKG + "methods/dst.py", "total_steps=max(1, end)",
      "total_steps=max(1, total_steps)", ("tests/test_dst.py",)),
    M("llt_accept_ge", _PKG + "methods/llt.py", "return not ref_acc - acc > accept",
      "return not ref_acc - acc >= accept", ("tests/test_llt.py",)),
    M("llt_keep_pruning_strict", _PKG + "methods/llt.py", "return drop <= max_drop or",
      "return drop < max_drop or", ("tests/test_llt.py",)),
    M("llt_kd_no_t_squared", _PKG + "methods/llt_teaching.py",
      "/ jnp.maximum(jnp.sum(w), 1.0) * temperature ** 2", "/ jnp.maximum(jnp.sum(w), 1.0)",
      ("tests/test_llt.py",)),
    M("prac_imp_kept_floor", _PKG + "methods/prac.py",
      "return int(round(total * (1.0 - rate) ** prunes))",
      "return int(total * (1.0 - rate) ** prunes)", ("tests/test_prac.py",)),
    M("prac_dynamic_epochs_round", _PKG + "methods/prac.py",
      "e = max(1, int(epochs * subset / total))", "e = max(1, round(epochs * subset / total))",
      ("tests/test_prac.py",)),
    # Issue 23: tests that must fail on what matters (each mapped to the one test that kills it).
    M("prac_cep_last_epoch_model", _PKG + "methods/prac.py",
      'pred = prac_sets.predictions(trainer, state, t, best["params"], best["batch_stats"])',
      "pred = prac_sets.predictions(trainer, state, t, state.params, state.batch_stats)",
      (_T_PRAC + "test_the_disagreement_set_compares_round_0_and_round_r_best_validation_models",)),
    M("prac_cep_against_previous_round", _PKG + "methods/prac_sets.py",
      "return cet | cep, cet, cep, jnp.where(later, dense_pred, pred)",
      "return cet | cep, cet, cep, pred",
      (_T_PRAC + "test_the_disagreement_set_compares_round_0_and_round_r_best_validation_models",)),
    M("prac_round_lr_milestones_unscaled", _PKG + "methods/prac.py",
      "lr_milestones=milestone_fractions(planned, ms), epoch_end=epoch_end)",
      "lr_milestones=milestone_fractions(plan.epochs, plan.milestones), epoch_end=epoch_end)",
      (_T_PRAC + "test_every_later_round_trains_its_floor_of_epochs_at_the_full_rate",)),
    M("prac_dynamic_milestones_round", _PKG + "methods/prac.py",
      "ms = [int(m * subset / total) for m in milestone_epochs]",
      "ms = [round(m * subset / total) for m in milestone_epochs]",
      (_T_PRAC + "test_the_learning_rate_a_round_gets_by_hand",)),
    M("llt_td_stash_rewinds_the_snapshot", _PKG + "methods/llt.py",
      'start = rewind(s.params, m["mask"], src, setup.spec)',
      'start = rewind(m["snap"], m["mask"], src, setup.spec)',
      (_T_LLT + "test_td_rounds_stash_and_rewind_across_rounds_and_tasks",)),
    M("llt_step_loss_kd_main_unweighted", _PKG + "methods/llt_step.py",
      "return aux_ce + gamma1 * kd_aux + gamma2 * (main_ce + gamma1 * kd_main)",
      "return aux_ce + gamma1 * kd_aux + gamma2 * main_ce + gamma1 * kd_main",
      (_T_LLT + "test_step_loss_total_against_each_term_computed_by_hand",)),
    M("llt_retrain_distils_the_next_query", _PKG + "methods/llt.py",
      '"unl": state.method["unl"]})', '"unl": state.method["unl_next"]})',
      (_T_LLT + "test_every_training_of_a_task_distils_from_its_own_stored_targets",)),
    M("eval_agnostic_head_offset", _PKG + "train/evaluation.py",
      "return jnp.argmax(flat, -1) == data_task * k + y", "return jnp.argmax(flat, -1) == data_task + y",
      ("tests/test_views.py::test_task_agnostic_of_a_multi_head_run_is_the_argmax_over_every_seen_head",)),
    M("eval_aware_every_seen_class", _PKG + "train/evaluation.py",
      "  logits = jnp.where(own[None, :], logits, jnp.finfo(logits.dtype).min)",
      "  logits = jnp.where(seen[data_task][None, :], logits, jnp.finfo(logits.dtype).min)",
      ("tests/test_views.py::test_task_aware_of_a_class_il_run_is_the_argmax_over_the_task_classes",)),
    # --- the rest of the harness, the experiment and the command line.
    M("ops_pool_overlap_stride", _PKG + "ops.py",
      "x.shape[3]), (1, sh, sw, 1))", "x.shape[3]), (1, sh, 1, 1))", ("tests/test_models.py",)),
    M("ops_pool_tie_to_last", _PKG + "ops.py",
      "  for p in reversed(range(len(parts) - 1)):", "  for p in range(len(parts) - 1):",
      ("tests/test_speed_paths.py",)),
    M("ops_pool_positions_transposed", _PKG + "ops.py",
      "    i, j = divmod(p, kw)", "    j, i = divmod(p, kh)", ("tests/test_speed_paths.py",)),
    M("ops_pool_rows_windows_miss_kept", _PKG + "ops.py",
      "rows = (pads[0][0], pads[0][1] - (h - (oh - 1) * sh - kh))", "rows = pads[0]",
      ("tests/test_speed_paths.py",)),
    M("config_learning_rate_allows_zero", _PKG + "config.py",
      "c.learning_rate = f(0.05, Number(0, lo_open=True))", "c.learning_rate = f(0.05, Number(0))",
      ("tests/test_config_fields.py",)),
    M("fields_upper_bound_always_closed", _PKG + "fields.py",
      "if hi and (value >= hi[0] if self.hi_open else value > hi[0]):",
      "if hi and value > hi[0]:", ("tests/test_config_fields.py",)),
    M("fields_increasing_allows_repeats", _PKG + "fields.py",
      "if self.increasing and any(not b > a for a, b in zip(value, value[1:])):",
      "if self.increasing and any(b < a for a, b in zip(value, value[1:])):",
      ("tests/test_config_fields.py",)),
    M("fields_infinity_is_a_number", _PKG + "fields.py",
      "if not _is_number(value) or not typed or not math.isfinite(value):",
      "if not _is_number(value) or not typed or math.isnan(value):",
      ("tests/test_config_fields.py",)),
    M("experiment_val_row_from_test", _PKG + "experiment.py",
      'R_val[t] = trainer.accuracy_row(state, t, "val")',
      'R_val[t] = trainer.accuracy_row(state, t, "test")', ("tests/test_experiment.py",)),
    M("cli_bool_default_false", _PKG + "cli.py", "    if text is None:\n      return True",
      "    if text is None:\n      return False", ("tests/test_cli.py",)),
)


def _copy_checkout(dest: pathlib.Path) -> None:
  ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "*.pyc")
  shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def _run_tests(where: pathlib.Path, tests, timeout: int) -> tuple[str, float]:
  env = dict(os.environ, PYTHONPATH=str(where), PYTHONDONTWRITEBYTECODE="1")
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  start = time.perf_counter()
  try:
    done = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - start
  outcome = {0: "passed", 5: "collected nothing"}.get(done.returncode, "failed")
  return outcome, time.perf_counter() - start


def check_list(mutants) -> list[str]:
  """Mutants whose text is not found exactly once, or whose test files do not exist."""
  bad = []
  for m in mutants:
    text = (ROOT / m.path).read_text()
    if text.count(m.old) != 1:
      bad.append(f"{m.name}: {m.path} has {text.count(m.old)} copies of the text to mutate")
    for t in m.tests:
      if not (ROOT / t.split("::")[0]).exists():
        bad.append(f"{m.name}: no test file {t}")
  names = [m.name for m in mutants]
  bad += [f"{n}: name used twice" for n in sorted({n for n in names if names.count(n) > 1})]
  return bad


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated mutant names")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per test run")
  a = parser.parse_args()
  mutants = MUTANTS
  if a.only:
    wanted = a.only.split(",")
    unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
    if unknown:
      parser.error(f"unknown mutant(s) {unknown}; see --list")
    mutants = tuple(m for m in MUTANTS if m.name in wanted)
  if a.list:
    for m in mutants:
      print(f"{m.name:34s} {m.path:40s} {' '.join(m.tests)}")
    return 0
  bad = check_list(mutants)
  if bad:
    print("error: the mutant list does not match the code:\n  " + "\n  ".join(bad))
    return 2
  with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
    work = pathlib.Path(tmp) / "repo"
    _copy_checkout(work)
    broken = set()
    for tests in sorted({m.tests for m in mutants}):
      outcome, secs = _run_tests(work, tests, a.timeout)
      print(f"baseline {' '.join(tests)}: {outcome} ({secs:.0f} s)", flush=True)
      if outcome != "passed":
        broken.add(tests)
    caught, survived, skipped = [], [], []
    for m in mutants:
      if m.tests in broken:
        skipped.append(m)
        continue
      target = work / m.path
      original = target.read_text()
      target.write_text(original.replace(m.old, m.new, 1))
      try:
        outcome, secs = _run_tests(work, m.tests, a.timeout)
      finally:
        target.write_text(original)
      verdict = "caught" if outcome in ("failed", "timeout") else "SURVIVED"
      (caught if verdict == "caught" else survived).append(m)
      print(f"{verdict:8s} {m.name:34s} {outcome:9s} {secs:5.0f} s", flush=True)
  counted = len(caught) + len(survived)
  equivalent = [m for m in survived if m.equivalent]
  real = [m for m in survived if not m.equivalent]
  print(f"\nkill rate: {len(caught)}/{counted} = {len(caught) / max(counted, 1):.1%} "
        f"({len(equivalent)} equivalent survivors; {len(skipped)} not run: baseline failed)")
  for m in real:
    print(f"  survived: {m.name} ({m.path}: {m.old!r} -> {m.new!r})")
  for m in equivalent:
    print(f"  equivalent: {m.name}: {m.equivalent}")
  return 0 if not real and not skipped else 1


if __name__ == "__main__":
  sys.exit(main())
