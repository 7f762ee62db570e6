"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine schedule.

Gradient accumulation lives in the train step (microbatches scanned inside one
jitted step), so one optimizer update is always one step: the schedule, the
logs and the checkpoints all count the same thing.
"""

import jax
import optax

_NEVER_DECAYED = ('bias', 'scale')
_EMBEDDINGS = ('token_embedding', 'position_embedding')


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """The rate of the update made at `step` (0 for the first): linear warmup to optim.lr over
  optim.warmup_steps updates, then cosine decay to lr * min_lr_ratio at the last update.

  Counted from 1 inside, so the first update moves the weights (lr / warmup_steps): a warmup
  that starts at exactly 0 makes step 1 a no-op that still consumes a batch.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(num_steps, optim_cfg.warmup_steps + 1),
      end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)
  return lambda step: schedule(step + 1)


def _param_name(path) -> str:
  """The parameter's own name: the last dict key on its path (boxes add attribute keys)."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the weights that get decoupled weight decay: matrices, not norms or biases."""
  def decays(path, _):
    name = _param_name(path)
    if name.endswith(_NEVER_DECAYED):
      return False
    return decay_embeddings or name not in _EMBEDDINGS
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(learning_rate_schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                  weight_decay=optim_cfg.weight_decay,
                  mask=lambda p: weight_decay_mask(p, optim_cfg.decay_embeddings)),
  )
