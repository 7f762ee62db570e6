"""Orbax checkpoints of everything a run needs to continue exactly.

Each step directory holds three items: `state` (params, optimizer state, step),
`data` (the Grain iterator's position, one file per process) and `meta` (the
config, the tokenizer's fingerprint and the model's shape). Saves are async:
training continues while the arrays are written. Orbax writes a step under a
temporary name and renames it when complete, and deletes old steps only after
that, so a crash mid-save leaves the earlier steps intact and the unfinished one
invisible. A step damaged later (a truncated or deleted file) is found when it
fails to restore: the run moves it aside and resumes from the newest step that
does restore.
"""

import os
import re
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxgpt.config import JaxgptError

# The fields whose change makes an old checkpoint unusable for the new config.
SHAPE_FIELDS = ('num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim', 'max_len',
                'position', 'norm', 'mlp', 'use_bias', 'tie_embeddings')


class DamagedCheckpoint(JaxgptError):
  """A step directory whose files are missing or cannot be read."""

  def __init__(self, step: int, directory: str, reason: str):
    self.reason = reason
    super().__init__(f'checkpoint step {step} in {directory} cannot be read ({reason}). Delete that step '
                     'directory to resume from an earlier one, or use a new --workdir.')


class Checkpointer:
  """A run's checkpoints. Given `keep`, it writes: it keeps the `keep` newest steps (and every
  step that is a multiple of `keep_every`, if set) and removes what killed runs left unfinished.
  Without `keep` it only reads, and never touches a save that a running training is writing."""

  def __init__(self, workdir: str, keep: int | None = None, keep_every: int = 0):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if keep is None:
      options = ocp.CheckpointManagerOptions(create=False)  # (read_only=True logs a warning on every use)
    else:
      policies = [ocp.checkpoint_managers.LatestN(keep)]
      if keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
      options = ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
          enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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
    directory = os.path.join(self.directory, str(step), 'data')
    names = os.listdir(directory) if os.path.isdir(directory) else []
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

  def restore_latest(self, abstract_state, data_iterator, expected_meta: dict, log):
    """(step, state) from the newest step that restores, or None when there is no step.

    Steps that fail to read are moved aside (to `<step>.damaged-<time>`, out of Orbax's sight, so
    the step can be written again) with a warning, once an earlier step has restored. When none
    restores, nothing is moved and the error names every step.
    """
    failures = []
    for step in reversed(self._manager.all_steps()):
      try:
        check_compatible(self.read_meta(step), expected_meta, os.path.dirname(self.directory))
        state, reason = self.restore(step, abstract_state, data_iterator), None
      except DamagedCheckpoint as e:
        reason = e.reason
      if _on_all_processes(reason is None):
        self._move_aside(failures, log)
        return step, state
      failures.append((step, reason or 'unreadable on another process'))
    if failures:
      raise JaxgptError(f'no checkpoint in {self.directory} can be read ('
                        + '; '.join(f'step {step}: {reason}' for step, reason in failures)
                        + '). Move those step directories away to start again, or use a new --workdir.')
    return None

  def _move_aside(self, failures, log) -> None:
    for step, reason in failures:
      damaged = os.path.join(self.directory, f'{step}.damaged-{time.strftime("%Y%m%d-%H%M%S")}')
      log(f'warning: checkpoint step {step} is damaged ({reason}); moved it to {damaged} '
          'and resumed from an earlier step.')
      if jax.process_index() == 0:
        os.rename(os.path.join(self.directory, str(step)), damaged)
    if failures:
      multihost_utils.sync_global_devices('jaxgpt damaged checkpoints moved')
      self._manager.reload()

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # a damaged array file surfaces as a plain Exception from TensorStore
      cause = e.__cause__ or e  # TensorStore's own error says which file and what is wrong with it
      detail = str(cause).splitlines()[0][:300] if str(cause) else 'no detail'
      raise DamagedCheckpoint(step, self.directory, f'{type(cause).__name__}: {detail}') from None

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


def _on_all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process: all of them must resume from the same step."""
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_compatible(meta: dict, expected: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint that belongs to another tokenizer or model shape."""
  if meta['tokenizer_fingerprint'] != expected['tokenizer_fingerprint']:
    raise JaxgptError(
        f'the checkpoint in {workdir} was trained with a different tokenizer '
        f'(fingerprint {meta["tokenizer_fingerprint"]}, now {expected["tokenizer_fingerprint"]}): '
        'the data settings changed. Use the same data settings as that run, or a new --workdir.')
  diffs = [f'{k}: checkpoint {meta["model_shape"][k]}, config {v}'
           for k, v in expected['model_shape'].items() if meta['model_shape'].get(k) != v]
  if diffs:
    raise JaxgptError(
        f'the checkpoint in {workdir} has a different model shape ({"; ".join(diffs)}). '
        'Use the same model settings as that run, or a new --workdir.')
