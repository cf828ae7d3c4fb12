r"""Fingerprints every method's ``:runlocal`` run, for refactoring that must keep behaviour.

  python benchmarks/runlocal_fingerprint.py --out=/tmp/fp_before.json
  python benchmarks/runlocal_fingerprint.py --out=/tmp/fp_after.json --compare=/tmp/fp_before.json

Each case runs ``experiments/main.py`` in its own process (the CLI end to end) and keeps
``results.json`` and ``metrics.csv`` without their wall-clock fields, so a
comparison checks accuracy matrices, densities, per-epoch losses and learning rates bit for bit.
Cases: every config's ``:runlocal``, the LLT and PrAC modes, BatchNorm models for the
parameter-isolation methods, and a run stopped after task 1 and resumed. ``--compare`` prints
every case that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES: dict[str, list[str]] = {
    'packnet': ['configs/packnet.py:runlocal'],
    'finetune': ['configs/finetune.py:runlocal'],
    'individual': ['configs/individual.py:runlocal'],
    'cpg': ['configs/cpg.py:runlocal'],
    'pae': ['configs/pae.py:runlocal'],
    'piggyback': ['configs/piggyback.py:runlocal'],
    'clnp': ['configs/clnp.py:runlocal'],
    'dst': ['configs/dst.py:runlocal'],
    'dst_cl': ['configs/dst_cl.py:runlocal'],
    'llt_td': ['configs/llt.py:runlocal'],
    'llt_bu': ['configs/llt.py:runlocal', '--config.llt.mode=bu'],
    'llt_dense': ['configs/llt.py:runlocal', '--config.llt.mode=dense'],
    'llt_imp': ['configs/llt.py:runlocal', '--config.llt.mode=imp'],
    'prac': ['configs/prac.py:runlocal'],
    'prac_imp': ['configs/prac.py:runlocal', '--config.prac.mode=imp'],
    'prac_snip': ['configs/prac.py:runlocal', '--config.prac.mode=snip'],
    'packnet_cnn_bn': ['configs/packnet.py:runlocal', '--config.model=small_convnet',
                       '--config.norm=task_batch'],
    'cpg_cnn_bn': ['configs/cpg.py:runlocal', '--config.model=small_convnet', '--config.norm=task_batch'],
    'dst_cl_cnn_bn': ['configs/dst_cl.py:runlocal', '--config.model=small_convnet',
                      '--config.norm=task_batch'],
}
# Multi-task cases also run stopped after task 1 and resumed (PrAC's runlocal is one task: its
# resume inside the task is tests/test_conformance.py's).
RESUMED = ('packnet', 'cpg', 'llt_bu', 'dst_cl')


def _main(args: list[str], workdir: str, extra: list[str] = ()) -> None:
  cmd = [sys.executable, str(ROOT / 'experiments' / 'main.py'), f'--config={args[0]}',
         f'--workdir={workdir}', *args[1:], *extra]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}')


def _timing(field: str) -> bool:
  """Fields that hold wall-clock times (never compared)."""
  return 'seconds' in field or field == 'time'


def _normalised(fp: dict) -> dict:
  """A fingerprint without timing fields (also for files written before a field was dropped)."""
  return {'results': {k: v for k, v in fp['results'].items() if not _timing(k)},
          'metrics': [{k: v for k, v in row.items() if not _timing(k)} for row in fp['metrics']]}


def _fingerprint(workdir: str) -> dict:
  results = json.loads(pathlib.Path(workdir, 'results.json').read_text())
  results = {k: v for k, v in results.items() if not _timing(k)}
  with open(pathlib.Path(workdir, 'metrics.csv'), newline='') as f:
    rows = [{k: v for k, v in row.items() if not _timing(k)} for row in csv.DictReader(f)]
  return {'results': results, 'metrics': rows}


def run_all(names: list[str], out_path: str | None = None) -> dict:
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      start = time.perf_counter()
      workdir = os.path.join(tmp, name)
      _main(CASES[name], workdir)
      out[name] = _fingerprint(workdir)
      if name in RESUMED:
        resumed = os.path.join(tmp, name + '_resumed')
        _main(CASES[name], resumed, ['--stop_after_task=1'])
        _main(CASES[name], resumed)
        out[name + '_resumed'] = _fingerprint(resumed)
      print(f'{name}: {time.perf_counter() - start:.1f} s', flush=True)
      if out_path:  # what finished so far survives a later failure
        pathlib.Path(out_path).write_text(json.dumps(out, indent=1, sort_keys=True))
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--compare', default=None)
  parser.add_argument('--cases', default=','.join(CASES))
  a = parser.parse_args()
  names = [n for n in a.cases.split(',') if n]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f'unknown case(s) {unknown}; choose from {sorted(CASES)}')
  got = run_all(names, a.out)
  pathlib.Path(a.out).write_text(json.dumps(got, indent=1, sort_keys=True))
  if a.compare is None:
    return 0
  want = json.loads(pathlib.Path(a.compare).read_text())
  differ = [k for k in got if k not in want or _normalised(want[k]) != _normalised(got[k])]
  for k in got:
    # A resumed process compiles only what it still runs: its trace counts differ by design.
    if k.endswith('_resumed') and ({**got[k]['results'], 'trace_counts': None} !=
                                   {**got[k[:-8]]['results'], 'trace_counts': None}):
      differ.append(k + ' (vs uninterrupted)')
  print('identical' if not differ else 'DIFFERENT: ' + ', '.join(differ))
  return 1 if differ else 0


if __name__ == '__main__':
  sys.exit(main())
