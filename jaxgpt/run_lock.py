"""One training run per workdir.

Two runs training into one workdir (the same command launched twice, or a
scheduler restarting a job whose old process still runs) would write over each
other's checkpoints. A training run holds an exclusive `flock` on a file in the
workdir; the operating system drops it when the process ends, however it ends
(`kill -9` included), so a dead run never leaves a stale lock behind. The file
says who holds it (host, process id, start time), for the refusal's message.

In a multi-process job, process 0 takes the lock for the whole job: the other
processes are its own, coordinated by jax.distributed. Sampling, evaluation and
serving only read a workdir, and take no lock. A workdir in a bucket (gs://) has
no flock: there nothing stops a second run, and the run says so as it starts.
"""

import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxgpt import paths
from jaxgpt.config import JaxgptError

LOCK_FILE = '.train.lock'


class RunLock:
  """The workdir's lock, from `acquire` until the `with` block holding it ends or the process does. It holds no
  file on the job's other processes, nor where the filesystem has no locks."""

  def __init__(self, file=None):
    self._file = file

  def __enter__(self) -> 'RunLock':
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def acquire(workdir: str) -> RunLock:
  """The workdir's lock for this job, or a JaxgptError naming the run that holds it."""
  lock, holder = _try_lock(workdir) if jax.process_index() == 0 else (RunLock(), None)
  refused = holder is not None
  if jax.process_count() > 1:  # every process of the job stops, not only process 0
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
  if refused:
    raise JaxgptError(f'--workdir {workdir} is in use by another training run ('
                      f'{holder or "see the error on process 0"}). Two runs in one workdir would overwrite each '
                      "other's checkpoints. Wait for that run to end (or stop it), or use another --workdir.")
  return lock


def _try_lock(workdir: str) -> tuple[RunLock, str | None]:
  """(the lock, None) when it is taken; (None, who holds it) when another process does."""
  if paths.is_remote(workdir):
    logging.warning('--workdir %s is in a bucket, where files cannot be locked: nothing stops a second training '
                    'run from using it at the same time. Start one run per workdir.', workdir)
    return RunLock(), None
  file = open(os.path.join(workdir, LOCK_FILE), 'a+')
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    file.seek(0)
    holder = file.read()
    file.close()
    return None, _describe_holder(holder)
  except OSError as e:
    # Some network filesystems have no locks: train anyway rather than refuse every run there.
    if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
      raise
    logging.warning('cannot lock --workdir %s (%s): nothing stops a second training run from using it at the '
                    'same time.', workdir, e.strerror)
    file.close()
    return RunLock(), None
  file.truncate(0)
  json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}, file)
  file.flush()
  return RunLock(file), None


def _describe_holder(holder: str) -> str:
  try:
    info = json.loads(holder)
  except ValueError:  # written by a run that has only just taken the lock
    return 'a run that is starting'
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))
  return f'process {info["pid"]} on host {info["host"]}, started {started}'
