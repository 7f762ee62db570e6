"""When training ends: after train.num_steps, or train.num_epochs passes over the training split, or earlier when
the validation loss stops improving (train.early_stopping_patience); and which validation was the best
(train.keep_best keeps its checkpoint).
"""

import dataclasses
import math

from jaxgpt.config import JaxgptError


def steps_per_epoch(config, train_tokens: int, train_pairs: int | None = None) -> tuple[float, str]:
  """Steps in one pass over the training split, and what the split holds (for the log).

  A language-model step reads batch_size rows of seq_len + 1 tokens of the packed stream; a DPO
  step (train_pairs given) reads batch_size preference pairs.
  """
  if train_pairs is not None:
    return train_pairs / config.batch_size, f'{train_pairs:,} preference pairs'
  return train_tokens / (config.batch_size * (config.seq_len + 1)), f'{train_tokens:,} tokens'


def resolve_num_steps(config, per_epoch: tuple[float, str], log) -> int:
  """The run's step count: train.num_steps, or the steps of train.num_epochs passes (`per_epoch` from
  `steps_per_epoch`), which then become train.num_steps, in the config the run saves."""
  epochs = config.train.num_epochs
  if not epochs:
    return config.train.num_steps
  epoch_steps, holds = per_epoch
  if epoch_steps <= 0:
    raise JaxgptError(f'train.num_epochs={epochs} needs training data, but the training split holds no '
                      f'{holds.split(" ", 1)[1]}. Check the data settings, or set train.num_steps instead.')
  # Rounded first, so that a product like 5.000000001 does not become 6 steps.
  steps = max(1, math.ceil(round(epochs * epoch_steps, 6)))
  log(f'train.num_epochs={epochs:g}: {steps} steps of batch_size={config.batch_size} over the {holds} of the '
      'training split')
  config.train.num_steps = steps
  return steps


@dataclasses.dataclass
class Validations:
  """The best validation loss so far, and how many validations since it.

  Saved in every checkpoint's meta (`to_meta`), so a resumed run stops where the uninterrupted one
  would. A validation that does not lower the best strictly (equal, higher, NaN) is not an improvement.
  """
  patience: int = 0  # validations without improvement that stop the run; 0 = never stop early
  best_step: int | None = None
  best_loss: float | None = None
  since_best: int = 0

  @classmethod
  def from_meta(cls, meta: dict | None, patience: int) -> 'Validations':
    saved = (meta or {}).get('validations', {})
    return cls(patience, saved.get('best_step'), saved.get('best_loss'), saved.get('since_best', 0))

  def add(self, step: int, loss: float) -> bool:
    """Records a validation; True when it is the best so far."""
    if self.best_loss is None or loss < self.best_loss:
      self.best_step, self.best_loss, self.since_best = step, float(loss), 0
      return True
    self.since_best += 1
    return False

  @property
  def exhausted(self) -> bool:
    """Whether the patience has run out: the run stops here."""
    return self.patience > 0 and self.since_best >= self.patience

  def to_meta(self) -> dict:
    return {'validations': {'best_step': self.best_step, 'best_loss': self.best_loss, 'since_best': self.since_best}}
