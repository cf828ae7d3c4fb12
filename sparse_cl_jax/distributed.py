"""Several processes, one run: JAX's multi-process runtime set up for the launchers.

Every launcher takes ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
(:func:`initialize`); with none of them, on a SLURM allocation, a Cloud TPU pod slice, Open MPI or
Kubernetes, ``jax.distributed.initialize()`` detects the processes itself. After that
``jax.devices()`` lists every process's devices and a run's ``'data'`` mesh (or a sweep's ``'run'``
mesh) spans all of them; each process runs the same program on its own devices (JAX's
multi-controller model).

What the package adds to JAX's runtime:

* one-line errors for flags that do not fit together and for a coordinator that cannot be reached;
* :func:`is_primary`: process 0 owns the files of a run (``run.json``, the lock, results, logs,
  plots); every process takes part in orbax's checkpoint saves and restores;
* :func:`barrier`, :func:`publish` and :func:`fetch`: agreement through the coordination service
  (its key-value store and barriers; no device collective, so threads of a sweep may call them in
  any order);
* a watchdog: when another process of the run stops (a crash, ``kill -9``, a lost node), this one
  stops within about 10 seconds with one line naming the process, instead of waiting on a
  collective until JAX's heartbeat timeout aborts it; when another process stops on an error
  (:func:`stop_all`), this one stops with one line saying which process and why. The rerun of the
  same command on every process resumes from the last checkpoint.

The coordination service's client is reached through ``jax._src.distributed`` (JAX has no public
handle on its key-value store); :func:`client` is the one place that does so.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from typing import Any

import jax

from sparse_cl_jax import reliability

# A process that stops sending heartbeats for this long is declared dead by JAX's coordination
# service (JAX's default is 100 s); the watchdog usually notices a lost process much sooner.
HEARTBEAT_SECONDS = 60
# The package's watchdog (below) declares a process gone sooner, with one line.
WATCH_INTERVAL_SECONDS = 1.0
STALE_SECONDS = 10.0
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")

_state: dict[str, Any] = {"initialized": False, "detected": None, "watchdog": None,
                          "counters": {}, "started": 0.0}
_lock = threading.Lock()


class DistributedError(reliability.FaultError):
  """The processes of a run cannot start together or lost each other (one line)."""


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
  """Whether the three flags ask for several processes; ValueError (one line) if inconsistent."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if all(v is None for v in given.values()):
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"{', '.join(missing)} missing: a run over several processes needs "
                     "--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I on "
                     "every process (the same address and N, I = 0 ... N-1)")
  if not _ADDRESS.match(coordinator_address):
    raise ValueError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT (process "
                     "0's host name or address and a free port, e.g. localhost:12355)")
  if int(coordinator_address.rsplit(":", 1)[1]) > 65535:
    raise ValueError(f"--coordinator_address={coordinator_address!r}: the port must be <= 65535")
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in 0 ... {num_processes - 1} "
                     f"(--num_processes={num_processes})")
  return num_processes > 1


def detected_cluster() -> str | None:
  """The cluster JAX's own detection finds (SLURM, TPU pod, Open MPI, Kubernetes), or None.

  Only when it holds more than one process: a single-task SLURM job runs as one process.
  ``SPARSE_CL_JAX_DETECT_CLUSTER=0`` turns the detection off (e.g. one process started by hand
  inside a many-task allocation, which would otherwise wait for the others that never come).
  """
  if os.environ.get("SPARSE_CL_JAX_DETECT_CLUSTER", "1").lower() in ("0", "false", "no", "off"):
    return None
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    kinds = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # a JAX without the detection: flags still work
    return None
  for kind in kinds:
    if getattr(kind, "opt_in_only_method", False):
      continue
    try:
      if not kind.is_env_present():
        continue
      count = kind.get_process_count()
    except Exception:  # pylint: disable=broad-except  # an environment it cannot read: not it
      continue
    if count is not None and int(count) > 1:
      return kind.__name__
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_seconds: int = 300,
               heartbeat_seconds: int = HEARTBEAT_SECONDS) -> bool:
  """Starts JAX's multi-process runtime when asked for or detected; returns whether it did.

  Must run before anything else uses JAX (the launchers call it right after parsing flags).

  Raises:
    ValueError: the flags do not fit together (one line; a usage error).
    DistributedError: the coordinator cannot be reached within ``timeout_seconds``.
  """
  several = check_flags(coordinator_address, num_processes, process_id)
  cluster = None if several or coordinator_address is not None else detected_cluster()
  if not several and cluster is None:
    return False
  with _lock:
    if _state["initialized"]:
      return True
    who = (f"process {process_id} of {num_processes}" if several else f"this {cluster} process")
    where = f" at {coordinator_address}" if coordinator_address else ""
    if several:  # JAX aborts the process (a native stack trace) when these fail; say it first
      _check_coordinator(coordinator_address, process_id, who, timeout_seconds)
    try:
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=int(timeout_seconds),
                                 heartbeat_timeout_seconds=int(heartbeat_seconds))
    except Exception as e:  # pylint: disable=broad-except  # JAX raises several kinds
      raise DistributedError(
          f"{who} could not join the run's coordinator{where} within {timeout_seconds} s "
          f"({reliability.one_line(e)[:200]}); start every process with the same "
          "--coordinator_address and --num_processes (process 0 on that host) and check that "
          "the port is free and reachable") from None
    _state.update(initialized=True, detected=cluster, started=time.monotonic())
  start_watchdog()
  reliability.set_stop_agreement(_agree_on_stop)
  return True


def _agree_on_stop(scope: str, local: int | None) -> int | None:
  """The signal any process of the run received by this point of ``scope``, or None."""
  c = client()
  if c is None:
    return local
  key = unique_key(f"stop/{scope}")
  me, n = jax.process_index(), jax.process_count()
  c.key_value_set(f"{key}/{me}", str(local or 0))
  found = local
  for i in range(n):
    if i == me:
      continue
    try:
      value = int(c.blocking_key_value_get(f"{key}/{i}", 3_600_000))
    except Exception as e:  # pylint: disable=broad-except
      raise DistributedError(f"{who()}: process {i} did not reach the same epoch end "
                             f"({reliability.one_line(e)[:160]}); rerun the same command on "
                             "every process to resume") from None
    if value and found is None:
      found = value
  if found is not None and local is None:
    reliability.request_stop(found)  # this process stops (and saves) with the others
  return found


def _check_coordinator(address: str, process_id: int, process: str,
                       timeout_seconds: float) -> None:
  """Process 0: its port is free; the others: process 0's port accepts connections in time.

  Raises DistributedError (one line) instead of JAX's abort. Processes that join the coordinator
  but never all arrive are still ended by JAX after ``timeout_seconds``.
  """
  host, port = address.rsplit(":", 1)
  host, port = host.strip("[]"), int(port)
  if process_id == 0:
    try:
      with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("", port))
    except OSError as e:
      raise DistributedError(f"{process}: cannot serve the coordinator on port {port} ({e.strerror}); "
                             "pick a free port in --coordinator_address on every process") from None
    return
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"{process} cannot reach the coordinator at {address} within {timeout_seconds:.0f} s "
            f"({e.strerror or e}); start process 0 with the same --coordinator_address (its "
            "host name or address and a free port) and check that this host can reach it") from None
      time.sleep(0.5)


def active() -> bool:
  """Whether this process is one of several of the same run."""
  return bool(_state["initialized"]) and jax.process_count() > 1


def process_index() -> int:
  return jax.process_index() if _state["initialized"] else 0


def process_count() -> int:
  return jax.process_count() if _state["initialized"] else 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; always true with one process)."""
  return process_index() == 0


def who() -> str:
  """``'process I of N'`` (for messages), ``''`` with one process."""
  return f"process {process_index()} of {process_count()}" if active() else ""


def client():
  """The coordination service's client of this process (None with one process)."""
  if not active():
    return None
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def unique_key(name: str) -> str:
  """``name`` with a per-process counter appended: the n-th use of a name is the same key on
  every process, provided every process uses its names in the same order (per name)."""
  with _lock:
    n = _state["counters"].get(name, 0)
    _state["counters"][name] = n + 1
  return f"sparse_cl_jax/{name}/{n}"


def barrier(name: str, timeout_seconds: float = 600.0) -> None:
  """Waits until every process reached barrier ``name`` (no-op with one process).

  A barrier of the coordination service, not a device collective: threads may wait on different
  barriers in any order.
  """
  c = client()
  if c is None:
    return
  try:
    c.wait_at_barrier(unique_key(name), int(timeout_seconds * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(f"{who()}: the other processes did not reach '{name}' within "
                           f"{timeout_seconds:.0f} s ({reliability.one_line(e)[:160]}); rerun "
                           "the same command on every process to resume") from None


def publish(name: str, value: str) -> None:
  """Process 0 tells the others ``value`` under ``name`` (read by :func:`fetch`)."""
  c = client()
  if c is not None:
    c.key_value_set(unique_key(name), value)


def fetch(name: str, timeout_seconds: float = 600.0) -> str:
  """What process 0 published under ``name`` (waits for it)."""
  c = client()
  try:
    return c.blocking_key_value_get(unique_key(name), int(timeout_seconds * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(f"{who()}: process 0 did not say '{name}' within "
                           f"{timeout_seconds:.0f} s ({reliability.one_line(e)[:160]}); rerun "
                           "the same command on every process to resume") from None


_LOST_PEER = re.compile(r"Gloo|Connection (reset|closed)|Socket closed|heartbeat|"
                        r"coordination service", re.IGNORECASE)


def error_line(message: str) -> str:
  """``'error: process I of N: ...'`` for this process; a collective that failed because another
  process is gone says so and what to do."""
  if _LOST_PEER.search(message):
    message = (f"another process of the run stopped or became unreachable ({message[:160]}); "
               "rerun the same command on every process to resume from the last checkpoint")
  return f"error: {who()}: {message}"


_ERROR = "sparse_cl_jax/error"
_ACK = "sparse_cl_jax/ack/{}"
ACK_SECONDS = 5.0


def stop_all(code: int, line: str | None, reason: str | None = None) -> None:
  """Ends this process with ``line`` after telling the others why (they stop with one line too).

  ``reason``: what the others are told when it is not ``line`` (e.g. ``line`` was printed already).

  The message goes through the coordination service; process 0, which hosts it, waits up to
  :data:`ACK_SECONDS` for the others' watchdogs to read it before it ends (its end would cut the
  others off the service, which JAX turns into a native abort).
  """
  c = client()
  if c is not None:
    stop_watchdog(done=False)
    try:
      c.key_value_set(_ERROR, f"{jax.process_index()}\t{reason or line}")
    except Exception:  # pylint: disable=broad-except  # another process announced first
      pass
    if jax.process_index() == 0:
      waiting = set(range(1, jax.process_count()))
      deadline = time.monotonic() + ACK_SECONDS
      while waiting and time.monotonic() < deadline:
        for i in sorted(waiting):
          try:
            c.key_value_try_get(_ACK.format(i))
            waiting.discard(i)
          except Exception:  # pylint: disable=broad-except  # not yet
            pass
        time.sleep(0.1)
  exit_now(code, line)


def _stop_for_another(c, me: int, n: int) -> bool:
  """The watchdog's check for another process's :func:`stop_all`: stops this one if there is."""
  try:
    said = c.key_value_try_get(_ERROR)
  except Exception:  # pylint: disable=broad-except  # NOT_FOUND: nobody stopped
    return False
  sender, _, line = said.partition("\t")
  if int(sender) == me:
    return False
  try:
    c.key_value_set(_ACK.format(me), "1")
  except Exception:  # pylint: disable=broad-except
    pass
  reason = re.sub(r"^error: process \d+ of \d+: ", "", line)
  exit_now(1, f"error: process {me} of {n}: process {sender} stopped the run: {reason}")
  return True


def exit_now(code: int, line: str | None = None) -> None:
  """Prints ``line`` on stderr and ends this process at once (no shutdown barrier to wait on)."""
  if line:
    print(line, file=sys.stderr, flush=True)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access


def shutdown() -> None:
  """Leaves the runtime after a run every process finished (waits for the others)."""
  stop_watchdog()
  reliability.set_stop_agreement(None)
  if _state["initialized"]:
    jax.distributed.shutdown()
    _state["initialized"] = False


def start_watchdog(interval: float = WATCH_INTERVAL_SECONDS,
                   stale_after: float = STALE_SECONDS) -> None:
  """Starts the thread that stops this process when another process of the run is gone.

  Every process writes a counter into the coordination service's key-value store each
  ``interval`` seconds and reads the others'; a counter that has not moved for ``stale_after``
  seconds (shorter than JAX's heartbeat timeout, which would abort the process with a native
  stack trace) means its process stopped. A process that ends normally marks itself done first.
  """
  if not active() or _state["watchdog"] is not None:
    return
  stop = threading.Event()
  thread = threading.Thread(target=_watch, args=(stop, interval, stale_after),
                            name="sparse_cl_jax-watchdog", daemon=True)
  _state["watchdog"] = (thread, stop)
  thread.start()


def stop_watchdog(done: bool = True) -> None:
  """Stops the watchdog; ``done``: tells the other processes' watchdogs this one ended normally."""
  if _state["watchdog"] is not None:
    thread, stop = _state["watchdog"]
    stop.set()
    thread.join(timeout=5)
    _state["watchdog"] = None
    if done:
      try:
        client().key_value_set(_ALIVE.format(jax.process_index()), "done", allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  # the others find out at shutdown
        pass


_ALIVE = "sparse_cl_jax/alive/{}"


def _watch(stop: threading.Event, interval: float, stale_after: float) -> None:
  c, n, me = client(), jax.process_count(), jax.process_index()
  others = [i for i in range(n) if i != me]
  seen: dict[int, tuple[str, float]] = {}
  beat = 0
  while True:
    now = time.monotonic()
    beat += 1
    values: dict[int, str] = {}
    try:
      c.key_value_set(_ALIVE.format(me), str(beat), allow_overwrite=True)
      for i in others:
        try:
          values[i] = c.key_value_try_get(_ALIVE.format(i))
        except Exception as e:  # pylint: disable=broad-except
          if "NOT_FOUND" not in str(e):  # else: process i has not written its first counter
            raise
    except Exception as e:  # pylint: disable=broad-except  # the coordinator itself is gone
      if stop.is_set():
        return
      exit_now(1, f"error: process {me} of {n}: lost contact with the run's coordinator "
               f"(process 0: {reliability.one_line(e)[:120]}); this process stops too; rerun "
               "the same command on every process to resume from the last checkpoint")
      return
    if _stop_for_another(c, me, n):
      return
    for i, value in values.items():
      if value == "done":
        seen[i] = (value, float("inf"))
      elif seen.get(i, ("", 0.0))[0] != value:
        seen[i] = (value, now)
    stalled = [i for i in others if i in seen and now - seen[i][1] > stale_after]
    if not stalled:
      stalled = [i for i in others if i not in seen and now - _state["started"] > 3 * stale_after]
    if stalled and not stop.is_set():
      names = ", ".join(map(str, stalled))
      exit_now(1, f"error: process {me} of {n}: process {names} of the run stopped (no sign of "
               f"life for {stale_after:.0f} s); this process stops too; rerun the same command "
               "on every process to resume from the last checkpoint")
      return
    if stop.wait(interval):
      return
