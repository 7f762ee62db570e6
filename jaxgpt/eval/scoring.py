"""Scoring given text: log p(continuation | context), and whether greedy decoding would have produced it.

The one scorer behind every evaluation that ranks or scores text rather than generating it: the
lm-evaluation-harness's loglikelihood requests (jaxgpt/eval/harness.py) and the sentiment recipe's
label words (jaxgpt/eval/tasks.py). Log-probabilities are the language-model loss's own token losses
(model.token_losses), negated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import JaxgptError
from jaxgpt.model import token_losses


@functools.partial(jax.jit, static_argnums=(0, 3))
def _token_scores(model, params, batch, with_greedy: bool):
  """Per target: its log-probability, and (with_greedy) whether it is the most likely token there."""
  logprobs_BxT = -token_losses(model, params, batch)
  if not with_greedy:
    return logprobs_BxT, jnp.ones_like(logprobs_BxT, bool)
  logits_BxTxV = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
  target_BxT = jnp.take_along_axis(logits_BxTxV, batch['targets'][..., None], axis=-1)[..., 0]
  return logprobs_BxT, target_BxT >= logits_BxTxV.max(axis=-1)


def continuation_scores(model, params, pairs, *, batch_size: int = 8, mesh=None,
                        with_greedy: bool = False) -> list[tuple[float, bool]]:
  """(log p(continuation | context) summed over the continuation, greedy?) for each (context ids,
  continuation ids) pair; `greedy?` is True unless asked for (with_greedy).

  A pair longer than the model's context keeps its end; a continuation longer than the context cannot
  be scored. Rows are batched longest first (little padding) in a few power-of-two lengths (few
  compilations). With a `mesh`, every process gives the same pairs and each batch is split over the
  mesh's batch axes.
  """
  max_len = model.cfg.max_len
  if any(len(continuation) > max_len for _, continuation in pairs):
    raise JaxgptError(f'a continuation to score is longer than the model\'s context of {max_len} tokens: '
                      'it cannot be scored. Evaluate a model with a longer context.')
  rows = [(list(context) + list(continuation))[-(max_len + 1):] for context, continuation in pairs]
  if mesh is not None:
    ways = sharding.data_parallel_size(mesh.shape)
    batch_size = -(-batch_size // ways) * ways
  results = [(0.0, True)] * len(pairs)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  for first in range(0, len(order), batch_size):
    chosen = order[first:first + batch_size]
    length = min(max_len, max(16, 1 << (max(len(rows[i]) - 1 for i in chosen) - 1).bit_length()))
    tokens_BxT = np.zeros((batch_size, length + 1), np.int32)
    for r, i in enumerate(chosen):
      tokens_BxT[r, :len(rows[i])] = rows[i]
    batch = {'inputs': tokens_BxT[:, :-1], 'targets': tokens_BxT[:, 1:],
             'segment_ids': np.ones((batch_size, length), np.int32),
             'positions': np.tile(np.arange(length, dtype=np.int32), (batch_size, 1))}
    if mesh is not None:
      batch = sharding.put_global(batch, {k: sharding.batch_sharding(mesh) for k in batch})
    logprobs_BxT, greedy_BxT = sharding.to_host(_token_scores(model, params, batch, with_greedy))
    for r, i in enumerate(chosen):
      end, n = len(rows[i]) - 1, len(pairs[i][1])  # the continuation is the row's last n targets
      results[i] = (float(np.sum(logprobs_BxT[r, end - n:end], dtype=np.float64)),
                    bool(greedy_BxT[r, end - n:end].all()))
  return results
