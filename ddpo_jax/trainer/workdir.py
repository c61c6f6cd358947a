"""A run's directory: refusing a missing one, and one run per directory at a time.

`resolve(workdir)` -> its absolute path, refusing '' (an unset shell variable would otherwise put
the run into the current directory). `lock(workdir)` is held by every training run for its
whole length: a second run on the same WORKDIR stops before it touches anything, with an error
naming the first (host, pid, start time, command).

The lock is a POSIX record lock (`fcntl.lockf`) on WORKDIR/run.lock, the kind NFS (v3 through
its lock manager, v4 natively) and local file systems share between hosts: the kernel releases
it when its process ends however it ends (kill -9 included), so a crashed run never leaves the
directory locked. The file itself stays, holding the last holder's host, pid and start time.
On a file system without record locks (ENOLCK / EOPNOTSUPP, e.g. some FUSE mounts of object
stores) the run goes on with a warning: one run per directory is then the user's to keep.

Multi-process runs take the lock once, in process 0, and every process learns whether it got
it (a collective): all of them stop together when another run holds the directory.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Callable, Iterator

import jax

LOCK_FILE = "run.lock"


class WorkdirInUseError(RuntimeError):
  """Another run holds the WORKDIR's lock."""


def resolve(workdir: str) -> str:
  """The absolute path of `workdir`.

  Raises:
    ValueError: `workdir` is empty or blank (e.g. `--workdir=$UNSET`).
  """
  if not str(workdir).strip():
    raise ValueError("--workdir is empty (an unset shell variable?): name the run's directory, "
                     "e.g. --workdir=workdirs/my_run")
  return os.path.abspath(os.path.expanduser(str(workdir)))


# Paths locked by this process -> [open file, depth]. POSIX record locks belong to the process,
# and closing any descriptor of the file drops them, so a nested `lock` of the same directory
# (CTRL's DDPO solver opens the loop inside CTRL's run) reuses the one descriptor.
_HELD: dict[str, list] = {}


def _holder(path: str) -> str:
  """The holder recorded in the lock file, in words ('unknown' if unreadable)."""
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
            f"{info.get('started', '?')} ({info.get('command', '?')})")
  except (OSError, ValueError):
    return "unknown (its lock file gives no holder)"


def _acquire(path: str, log: Callable[[str], object]):
  """Opens and locks `path`; the open file, or None where the file system has no locks."""
  f = open(path, "a+")
  try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EACCES, errno.EAGAIN):
      f.close()
      raise WorkdirInUseError(
          f"{os.path.dirname(path)} is in use by another run: {_holder(path)}. Wait for it to "
          "end (or stop it), or give this run another --workdir") from None
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      f.close()
      log(f"warning: the file system of {os.path.dirname(path)} has no file locks "
          f"({errno.errorcode[e.errno]}): nothing stops a second run on this WORKDIR")
      return None
    f.close()
    raise
  f.seek(0)
  f.truncate()
  f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "command": " ".join(sys.argv)[:500]}) + "\n")
  f.flush()
  return f


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))


@contextlib.contextmanager
def lock(workdir: str, log: Callable[[str], object] = print) -> Iterator[str]:
  """Holds WORKDIR's run lock for the block (creating WORKDIR); yields its absolute path.

  Raises:
    ValueError: `workdir` is empty.
    WorkdirInUseError: another run holds the lock (the message names it); nothing in WORKDIR
      has been changed. In a multi-process run every process raises.
  """
  path = resolve(workdir)
  lock_path = os.path.join(path, LOCK_FILE)
  if lock_path in _HELD:
    _HELD[lock_path][1] += 1
    try:
      yield path
    finally:
      _HELD[lock_path][1] -= 1
    return
  error, held = None, None
  if jax.process_index() == 0:
    try:
      os.makedirs(path, exist_ok=True)
      held = _acquire(lock_path, log)
    except Exception as e:  # noqa: BLE001  (the other processes must stop with it, not wait)
      error = e
  if not _all_processes_agree(error is None):
    raise error or WorkdirInUseError(f"{path} is in use by another run (process 0 could not "
                                     "take its lock)")
  _HELD[lock_path] = [held, 1]
  try:
    yield path
  finally:
    _HELD.pop(lock_path)
    if held is not None:
      held.close()  # releases the lock
