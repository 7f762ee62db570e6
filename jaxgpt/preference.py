"""Preference tuning: the DPO loss (and IPO) from log-probabilities, beside the language-model loss.

A batch of pairs (arrays [pairs, 2, seq_len], chosen then rejected; jaxgpt/data/preference.py) runs through the
model as 2 x pairs rows. A response's log-probability is the sum over its scored tokens of log p(token), read
from model.token_losses, the path the language-model loss takes too. With the frozen reference model's the same
way, and h the chosen response's log-ratio (policy over reference) minus the rejected one's:

  DPO (dpo.loss='sigmoid'):  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = label smoothing
  IPO (dpo.loss='ipo'):      loss = (h - 1 / (2 beta))^2, h from per-token mean log-probabilities

Each response's implicit reward is beta times its log-ratio. Reported per pair: the reward margin (chosen minus
rejected: beta h), accuracy (the chosen response has the higher reward; a tie counts half, so a policy equal to
its reference scores 50%), and `kl`, an estimate of the policy's KL divergence from the reference per token:
Schulman's k3, the mean of exp(-d) - 1 + d with d the token's log-ratio, over the chosen responses' tokens
(never negative, 0 where the models agree). It is unbiased for tokens the policy samples; the chosen responses
are the nearest the data has to those (the rejected ones, which the policy learns to avoid, would inflate it).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import JaxgptError, mixture_parts
from jaxgpt.evaluation import summarize
from jaxgpt.model import token_losses

OBJECTIVES = ('lm', 'dpo')
LOSSES = ('sigmoid', 'ipo')
FIGURES = ('reward_margin', 'accuracy', 'kl')  # per pair, besides the loss


def settings(config):
  """The run's DPO settings, or None when it trains with the language-model loss."""
  return config.dpo if config.train.objective == 'dpo' else None


def check_config(config) -> None:
  """Refuses an objective and preference settings that cannot work, all of them in one message."""
  data_cfg, dpo_cfg = config.data, config.dpo
  formats = [part.format for _, part in mixture_parts(data_cfg).values()] or [data_cfg.format]
  problems = []
  if config.train.objective not in OBJECTIVES:
    problems.append(f'train.objective={config.train.objective!r} is not one of {", ".join(map(repr, OBJECTIVES))}')
  elif config.train.objective == 'dpo':
    if data_cfg.mixture:
      problems.append("train.objective='dpo' reads one source of pairs: leave data.mixture empty")
    elif data_cfg.format != 'preference':
      problems.append("train.objective='dpo' trains on preference pairs: set data.format='preference' "
                      '(JSONL of {"prompt", "chosen", "rejected"})')
    if not config.init_from:
      problems.append("train.objective='dpo' tunes a model, which is also its frozen reference: set init_from "
                      '(a Hugging Face or jaxgpt run directory)')
    if dpo_cfg.loss not in LOSSES:
      problems.append(f'dpo.loss={dpo_cfg.loss!r} is not one of {", ".join(map(repr, LOSSES))}')
    if not dpo_cfg.beta > 0:
      problems.append(f'dpo.beta={dpo_cfg.beta} must be positive')
    if not 0 <= dpo_cfg.label_smoothing < 0.5:
      problems.append(f'dpo.label_smoothing={dpo_cfg.label_smoothing} must be in [0, 0.5)')
    elif dpo_cfg.label_smoothing and dpo_cfg.loss == 'ipo':
      problems.append("dpo.label_smoothing applies to dpo.loss='sigmoid', not 'ipo': set it to 0")
  elif 'preference' in formats:
    problems.append("data.format='preference' holds pairs for preference tuning: set train.objective='dpo'")
  if problems:
    raise JaxgptError('invalid config: ' + '; '.join(problems) + '.')


def token_log_probs(model, params, batch: dict, rng=None):
  """log p(target) of every target of a pair batch, shaped [pairs, 2, seq_len] (the loss mask not applied)."""
  rows = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
  return -token_losses(model, params, rows, rng).reshape(batch['targets'].shape)


def dpo_loss(policy, reference, tokens, dpo_cfg) -> dict:
  """Per pair: loss, reward_margin and accuracy, from each response's log-probability under the policy and the
  reference ([pairs, 2], chosen then rejected) and its number of scored tokens (for IPO's means)."""
  if dpo_cfg.loss == 'ipo':
    policy, reference = policy / jnp.maximum(tokens, 1), reference / jnp.maximum(tokens, 1)
  log_ratio = policy - reference
  h = log_ratio[:, 0] - log_ratio[:, 1]
  if dpo_cfg.loss == 'ipo':
    loss = (h - 1 / (2 * dpo_cfg.beta)) ** 2
  else:
    smoothing = dpo_cfg.label_smoothing
    loss = -(1 - smoothing) * jax.nn.log_sigmoid(dpo_cfg.beta * h) - smoothing * jax.nn.log_sigmoid(-dpo_cfg.beta * h)
  accuracy = jnp.where(h > 0, 1.0, jnp.where(h == 0, 0.5, 0.0))
  return {'loss': loss, 'reward_margin': dpo_cfg.beta * h, 'accuracy': accuracy}


def kl_estimate(policy_tokens, reference_tokens, mask):
  """Per sequence: the mean of exp(-d) - 1 + d over the scored tokens, d = log policy - log reference."""
  d = (policy_tokens - reference_tokens) * mask  # 0 off the mask, where exp(-d) - 1 + d is 0 too
  return (jnp.exp(-d) - 1 + d).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def _pair_figures(model, params, reference_params, batch, dpo_cfg, rng):
  """(per pair figures, 1 for pairs with a scored response (not padding), policy log-probs per token)."""
  mask = batch['loss_mask'].astype(jnp.float32)
  policy = token_log_probs(model, params, batch, rng) * mask
  reference = token_log_probs(model, reference_params, batch) * mask
  figures = dpo_loss(policy.sum(-1), reference.sum(-1), mask.sum(-1), dpo_cfg)
  figures['kl'] = kl_estimate(policy[:, 0], reference[:, 0], mask[:, 0])
  return figures, (mask[:, 0].sum(-1) > 0).astype(jnp.float32), policy


def dpo_sums(model, params, reference_params, batch: dict, dpo_cfg, rng=None):
  """(sum of the pairs' losses, (pairs, {figure: sum over the pairs})): the train step's form of the loss,
  in sums, like model.loss_sums, so that microbatches add up exactly."""
  figures, real, _ = _pair_figures(model, params, reference_params, batch, dpo_cfg, rng)
  return (figures['loss'] * real).sum(), (real.sum(), {name: (figures[name] * real).sum() for name in FIGURES})


def eval_sums(model, params, reference_params, batch: dict, dpo_cfg, token_bytes) -> dict:
  """Sums over a batch of held-out pairs: the DPO figures, and the chosen responses' loss, tokens and bytes."""
  figures, real, policy = _pair_figures(model, params, reference_params, batch, dpo_cfg, None)
  chosen_mask = batch['loss_mask'][:, 0]
  return {'pairs': real.sum(), **{name: (figures[name] * real).sum() for name in ('loss',) + FIGURES},
          'chosen_loss': -policy[:, 0].sum(), 'chosen_tokens': chosen_mask.sum(),
          'chosen_bytes': (jnp.asarray(token_bytes)[batch['targets'][:, 0]] * chosen_mask).sum()}


def held_out_metrics(eval_step, params, pairs, config, mesh, whole_split: bool = False) -> dict:
  """The held-out pairs' DPO loss, accuracy, reward margin and KL estimate (means over the pairs), and under
  'chosen_responses' the loss, perplexity and bits per byte of their chosen responses: whether DPO keeps the
  chosen responses likely, which its loss alone does not say.

  `eval_step(params, batch)` returns `eval_sums`. Periodic validations read a fixed random sample of
  train.eval_batches batches of pairs; `whole_split` reads every pair, the last batch filled with padding pairs
  that count for nothing. Every process reads the whole batches and keeps its own rows.
  """
  size = config.batch_size
  order = np.arange(len(pairs)) if whole_split else (
      np.random.default_rng(0).permutation(len(pairs))[:config.train.eval_batches * size])
  rows = size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  totals = collections.Counter()
  for first in range(0, len(order), size):
    examples = [pairs[int(i)] for i in order[first:first + size]]
    examples += [pairs.empty()] * (size - len(examples))
    local = {key: np.stack([example[key] for example in examples])[mine] for key in examples[0]}
    sums = jax.device_get(eval_step(params, sharding.global_batch(local, mesh)))
    totals.update({name: float(value) for name, value in sums.items()})
  count = max(totals['pairs'], 1.0)
  return {**{name: totals[name] / count for name in ('loss',) + FIGURES}, 'pairs': int(totals['pairs']),
          'chosen_responses': summarize(totals['chosen_loss'], totals['chosen_tokens'], totals['chosen_bytes'])}
