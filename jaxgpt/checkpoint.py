"""Orbax checkpoints of everything a run needs to continue exactly.

Each step directory holds three items: `state` (params, optimizer state, step),
`data` (the Grain iterator's position, one file per process) and `meta` (the
config, the tokenizer's fingerprint and the model's shape). Saves are async:
training continues while the arrays are written, and Orbax commits a step
directory atomically, so a crash mid-save never damages an earlier step.
"""

import os

import grain
import orbax.checkpoint as ocp

from jaxgpt.config import JaxgptError

# The fields whose change makes an old checkpoint unusable for the new config.
SHAPE_FIELDS = ('num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim', 'max_len',
                'position', 'norm', 'mlp', 'use_bias', 'tie_embeddings')


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True))

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

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings in `abstract_state`, and the iterator in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore(step, **items)['state']

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
      raise JaxgptError(
          f'checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: '
          f'{str(e).splitlines()[0][:300]}). Delete that step directory to resume from an '
          'earlier one, or use a new --workdir.') from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
