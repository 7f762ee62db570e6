"""Orbax checkpoints of everything a run needs to continue exactly.

Each step directory holds three items: `state` (params, optimizer state, step),
`data` (the Grain iterator's position, one file per process) and `meta` (the
config, the tokenizer's fingerprint and the model's shape). Saves are async:
training continues while the arrays are written. Orbax writes a step under a
temporary name and renames it when complete, and deletes old steps only after
that, so a crash mid-save leaves the earlier steps intact and the unfinished one
invisible. A step damaged later (a truncated or deleted file) is found when it
fails to restore: the run moves it aside and resumes from the newest step that
does restore. A read that fails for a while and may pass (an I/O error, a timeout,
a lost connection to a bucket) is not damage: it is tried again, and if it keeps
failing the run stops without moving anything.
"""

import dataclasses
import errno
import re
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxgpt import paths
from jaxgpt.config import JaxgptError

# The model fields that decide the parameters' shapes: a base model (init_from) must agree on them.
# The model settings a user states (and a base model must match); the switches that add weights follow.
STATED_SHAPE_FIELDS = ('num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim', 'max_len',
                       'position', 'norm', 'mlp', 'use_bias', 'tie_embeddings')
PARAM_SHAPE_FIELDS = STATED_SHAPE_FIELDS + ('qkv_bias', 'mlp_bias', 'output_bias', 'shared_norm')
# The fields whose change makes an old checkpoint unusable for the new config: those shapes, and whether the
# layers' parameters are stacked into one array per weight (scan_layers). A base model's parameters are
# converted to the config's layout as they load, so a base model need not agree on that.
SHAPE_FIELDS = PARAM_SHAPE_FIELDS + ('scan_layers',)
# Fields that checkpoints record only since a later version: one without them was written with these values.
_UNRECORDED_SHAPE_FIELDS = {'scan_layers': True, 'qkv_bias': False, 'mlp_bias': False, 'output_bias': False,
                            'shared_norm': False}

# Pauses before reading a step again after a storage error that may pass (about half a minute in all).
RETRY_PAUSES_SECONDS = (2, 4, 8, 16)
# errno values of storage that fails for a while and comes back: a disk or network hiccup, a server restarting.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
                               errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
                               errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ESTALE})
# TensorStore raises ValueError("<status code>: ... [os_error_code='5']"): the code names the kind of failure,
# and the errno, when an OS call failed, is in the message. Its bucket drivers report HTTP 408, 429 and 5xx as
# UNAVAILABLE once their own retries are spent; ETIMEDOUT is DEADLINE_EXCEEDED, EIO is UNKNOWN.
_TRANSIENT_TENSORSTORE_CODES = ('UNAVAILABLE:', 'DEADLINE_EXCEEDED:')
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
# What reading a step came to, from best to worst.
_RESTORED, _DAMAGED, _UNAVAILABLE = range(3)


class DamagedCheckpoint(JaxgptError):
  """A step directory whose files are missing or cannot be read."""

  def __init__(self, step: int, directory: str, reason: str):
    self.reason = reason
    super().__init__(f'checkpoint step {step} in {directory} cannot be read ({reason}). Delete that step '
                     'directory to resume from an earlier one, or use a new --workdir.')


class StorageUnavailable(JaxgptError):
  """Checkpoints not read for a reason that may pass: the storage failed, not the files."""

  def __init__(self, what: str, reason: str):
    self.reason = reason
    super().__init__(f'{what} could not be read: the storage failed ({reason}). That is an error that may pass '
                     '(a disk or network hiccup), not a damaged checkpoint, so nothing was moved or skipped. Run '
                     'the same command again when the storage is back.')


@dataclasses.dataclass
class _KeepStep(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves one step, which may change as the run goes (the best validation's); None preserves none."""
  step: int | None = None

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [checkpoint.step == self.step for checkpoint in checkpoints]


class Checkpointer:
  """A run's checkpoints. Given `keep`, it writes: it keeps the `keep` newest steps (and every
  step that is a multiple of `keep_every`, if set, and the step given to `keep_also`) and removes
  what killed runs left unfinished. Without `keep` it only reads, and never touches a save that a
  running training is writing."""

  def __init__(self, workdir: str, keep: int | None = None, keep_every: int = 0):
    self.directory = paths.path(workdir) / 'checkpoints'  # a local path or a bucket URL
    self._kept = _KeepStep()
    if keep is None:
      options = ocp.CheckpointManagerOptions(create=False)  # (read_only=True logs a warning on every use)
    else:
      policies = [ocp.checkpoint_managers.LatestN(keep), self._kept]
      if keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
      options = ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
          enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # it reads every step's metadata as it starts
      transient = _transient_cause(e)
      if transient is None:
        raise
      raise StorageUnavailable(f'the checkpoints in {self.directory}', _describe(transient)) from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def keep_also(self, step: int | None) -> None:
    """Keeps `step` (the best validation's) through every later rotation, in place of the step kept before."""
    self._kept.step = step

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    """`data_iterator` None: no data position (a converted checkpoint, never trained here)."""
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict:
    return self._restore(step, meta=ocp.args.JsonRestore())['meta']

  def data_saved_by_other_process_count(self, step: int) -> int | None:
    """The number of processes that wrote the step's data positions (one file each) when it is not
    this run's; None when it is, or when the step has none."""
    directory = self.directory / str(step) / 'data'
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    counts = {int(m.group(1)) for m in map(re.compile(r'process_\d+-of-(\d+)\.json$').match, names) if m}
    return counts.pop() if len(counts) == 1 and jax.process_count() not in counts else None

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings in `abstract_state`, and the iterator in place.

    Data positions are per process: written by another number of processes, they are left
    unread and the iterator is not touched (the caller decides how to go on).
    """
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and not self.data_saved_by_other_process_count(step):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore(step, **items)['state']

  def restore_params(self, step: int, abstract_params):
    """The state's params alone, for inference: the optimizer state is never read (a partial restore).

    Each leaf of `abstract_params` (ShapeDtypeStructs) gives its array's dtype, cast as it is read,
    and its sharding; one without a sharding comes back as a NumPy array. A Checkpointer that has
    restored params restores no whole state (Orbax keeps the first way an item was read).
    """
    item = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self._restore(step, state=args)['state']['params']

  def restore_latest(self, abstract_state, data_iterator, expected_meta: dict, log):
    """(step, state) from the newest step that restores, or None when there is no step.

    A read that fails in a way that may pass (an I/O error, a timeout, a lost connection) is tried
    again after growing pauses; if it keeps failing, the run stops with StorageUnavailable and moves
    nothing, rather than resume from an older step. Steps that fail to read (missing or unreadable
    files) are moved aside (to `<step>.damaged-<time>`, out of Orbax's sight, so the step can be
    written again) with a warning, once an earlier step has restored. When none restores, nothing is
    moved and the error names every step.
    """
    failures = []
    for step in reversed(self._manager.all_steps()):
      state, error = None, None
      try:
        state = self._restore_retrying(step, abstract_state, data_iterator, expected_meta, log)
      except (DamagedCheckpoint, StorageUnavailable) as e:
        error = e
      # All processes must resume from the same step, and all stop if any one cannot reach the storage.
      outcome = _worst_on_all_processes(
          _RESTORED if error is None else _DAMAGED if isinstance(error, DamagedCheckpoint) else _UNAVAILABLE)
      if outcome == _RESTORED:
        self._move_aside(failures, log)
        return step, state
      if outcome == _UNAVAILABLE:
        raise error if isinstance(error, StorageUnavailable) else StorageUnavailable(
            f'checkpoint step {step} in {self.directory}', 'on another process')
      failures.append((step, error.reason if error else 'unreadable on another process'))
    if failures:
      raise JaxgptError(f'no checkpoint in {self.directory} can be read ('
                        + '; '.join(f'step {step}: {reason}' for step, reason in failures)
                        + '). Move those step directories away to start again, or use a new --workdir.')
    return None

  def _restore_retrying(self, step: int, abstract_state, data_iterator, expected_meta: dict, log):
    """The step's state once its meta matches the run's, reading it again while the storage fails transiently."""
    for attempt, pause in enumerate((*RETRY_PAUSES_SECONDS, None), start=1):
      try:
        check_compatible(self.read_meta(step), expected_meta, self.directory.parent)
        return self.restore(step, abstract_state, data_iterator)
      except StorageUnavailable as e:
        if pause is None:
          raise StorageUnavailable(f'checkpoint step {step} in {self.directory}',
                                   f'{e.reason}; {attempt} tries over {sum(RETRY_PAUSES_SECONDS):g}s') from None
        log(f'warning: reading checkpoint step {step} failed ({e.reason}); trying again in {pause:g}s.')
        time.sleep(pause)

  def _move_aside(self, failures, log) -> None:
    for step, reason in failures:
      damaged = self.directory / f'{step}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
      log(f'warning: checkpoint step {step} is damaged ({reason}); moved it to {damaged} '
          'and resumed from an earlier step.')
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(damaged)  # in a bucket: a copy, then a delete
    if failures:
      multihost_utils.sync_global_devices('jaxgpt damaged checkpoints moved')
      self._manager.reload()

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # an array's read error surfaces as a plain Exception from Orbax, caused by TensorStore's
      transient = _transient_cause(e)
      if transient is not None:
        raise StorageUnavailable(f'checkpoint step {step} in {self.directory}', _describe(transient)) from None
      # TensorStore's own error says which file and what is wrong with it.
      raise DamagedCheckpoint(step, self.directory, _describe(e.__cause__ or e)) from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    """Waits for the save in flight, so that an error or a stop never leaves it half-written."""
    self.wait()
    self.close()


def _worst_on_all_processes(outcome: int) -> int:
  """The worst of the processes' outcomes of reading a step."""
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _transient_cause(error: BaseException) -> BaseException | None:
  """The error in `error`'s chain that says the storage failed in a way that may pass, or None."""
  while error is not None:
    if isinstance(error, (TimeoutError, ConnectionError)) or (
        isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS):
      return error
    if isinstance(error, ValueError):  # TensorStore's errors
      message = str(error)
      if message.startswith(_TRANSIENT_TENSORSTORE_CODES) or any(
          int(code) in _TRANSIENT_ERRNOS for code in _TENSORSTORE_ERRNO.findall(message)):
        return error
    error = error.__cause__ or error.__context__
  return None


def _describe(error: BaseException) -> str:
  """The error's type and first line, cut short. TensorStore's names the file first and what failed last, then
  appends its whole spec: the spec goes, and a long middle."""
  detail = (re.split(r' \[(?:tensorstore_spec|os_error_code)', str(error))[0].splitlines() or ['no detail'])[0]
  return f'{type(error).__name__}: {detail if len(detail) <= 300 else f"{detail[:150]} ... {detail[-150:]}"}'


def check_compatible(meta: dict, expected: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint that belongs to another tokenizer or model shape."""
  if meta['tokenizer_fingerprint'] != expected['tokenizer_fingerprint']:
    raise JaxgptError(
        f'the checkpoint in {workdir} was trained with a different tokenizer '
        f'(fingerprint {meta["tokenizer_fingerprint"]}, now {expected["tokenizer_fingerprint"]}): '
        'the data settings changed. Use the same data settings as that run, or a new --workdir.')
  saved = {**_UNRECORDED_SHAPE_FIELDS, **meta['model_shape']}
  diffs = [f'{k}: checkpoint {saved.get(k)}, config {v}'
           for k, v in expected['model_shape'].items() if saved.get(k) != v]
  if diffs:
    raise JaxgptError(
        f'the checkpoint in {workdir} has a different model shape ({"; ".join(diffs)}). '
        'Use the same model settings as that run, or a new --workdir.')
