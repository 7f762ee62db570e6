"""Text generation from a trained run: `python -m jaxgpt.sample --workdir DIR --prompt "..."`.

Decoding is a prefill of the prompts into a fixed-size key/value cache, then a
jitted `lax.while_loop` that feeds one token per row per step. Prompts of
different lengths decode together: each row writes at its own position. Every
row has its own sampling settings (greedy, temperature, top-k, top-p, seed,
stop sequences, max new tokens), so a server can batch unrelated requests, and
a row's result does not depend on what else is in the batch: its random key
is derived from its own seed and position only.

Shapes are rounded up to powers of two (prompt buffer, cache, stop table), so
a few compilations serve any mix of prompts. `stream` runs the loop in chunks
and yields the new tokens after each; `generate` runs it to the end. On the
mesh in use (`sharding.activation_rules`) the batch, padded to the mesh's batch
ways, and the cache are split over it (docs/sharding.md).

Log-probabilities (each new token's, and the likeliest tokens' at its step)
are computed only in a batch with a row that asks for them (`Sampling.logprobs`);
other batches run the very loop they ran before log-probs existed.
"""

import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import inference, run_dir, sharding
from jaxgpt.config import JaxgptError, run_cli
from jaxgpt.model import CACHE_AXES, GPT, init_cache, unscanned

SEED_LIMIT = 2**32  # seeds are uint32 on the device
MAX_TOP_LOGPROBS = 20  # alternatives a row may ask for at each step (as OpenAI's API)
DEFAULT_MAX_NEW_TOKENS = 128  # the commands' length when the user sets none and the context has room


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one prompt is continued; settings that cannot work are refused here, so no entry point passes them on."""
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 is greedy
  top_k: int = 0  # sample among the k most likely tokens; 0 = no limit
  top_p: float = 1.0  # nucleus: the smallest set of tokens holding this much probability
  seed: int = 0
  stop: tuple[str, ...] = ()  # text that ends the continuation (not included in it)
  logprobs: int | None = None  # also each new token's log-prob, and this many likeliest tokens'; None: not computed
  prompt_logprobs: bool = False  # the prompt tokens' too (with `logprobs` alternatives each)

  def __post_init__(self):
    # A bad row must fail where it is made: in a batch it would fail every other row decoded with it.
    # The comparisons are written so that NaN fails them too.
    problems = [message for valid, message in (
        (self.max_new_tokens >= 1, f'max_new_tokens={self.max_new_tokens} must be at least 1.'),
        (self.temperature >= 0, f'temperature={self.temperature} must not be negative (0 is greedy).'),
        (self.top_k >= 0, f'top_k={self.top_k} must not be negative (0 keeps every token).'),
        (0 < self.top_p <= 1, f'top_p={self.top_p} must be in (0, 1] (1 keeps every token).'),
        (0 <= self.seed < SEED_LIMIT, f'seed={self.seed} must be an integer from 0 to {SEED_LIMIT - 1}.'),
        (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
         f'logprobs={self.logprobs} must be from 0 to {MAX_TOP_LOGPROBS} (or None: not computed).'),
        (self.logprobs is not None or not self.prompt_logprobs, 'prompt_logprobs needs logprobs set.'),
    ) if not valid]
    if problems:
      raise JaxgptError(' '.join(problems))


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A token's log-probability under the model (before temperature, top-k and top-p), and the likeliest tokens'."""
  token: int
  logprob: float
  top: tuple[tuple[int, float], ...]  # (token, log-prob) at the same step, the most likely first


@dataclasses.dataclass
class Continuation:
  tokens: list[int]
  finish_reason: str  # 'stop' (EOS or a stop sequence) or 'length' (max_new_tokens reached)
  logprobs: list[TokenLogprob] | None = None  # one per token, when the row's Sampling asks for them
  prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens after the first: in the first yield only


def _pow2_at_least(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _check_fits(max_new_tokens: int, max_len: int) -> None:
  if not 0 < max_new_tokens < max_len:
    raise JaxgptError(f'max_new_tokens={max_new_tokens} must be between 1 and {max_len - 1} '
                      f'(the context is {max_len} tokens and the prompt needs at least one).')


def fitting_max_new_tokens(requested: int | None, max_len: int, prompt_tokens: int) -> tuple[int, str]:
  """Tokens to generate after a prompt of `prompt_tokens` tokens, and a note for the user ('' when none).

  `requested` None (the user set no length) takes as many as fit in the
  `max_len`-token context, up to DEFAULT_MAX_NEW_TOKENS, so the default works
  on every run; the note says when that is fewer. A requested length must fit
  the context (1 to max_len - 1); a prompt too long to fit beside it keeps its
  end, as `stream` does.
  """
  if requested is not None:
    _check_fits(requested, max_len)
    return requested, ''
  fitting = min(DEFAULT_MAX_NEW_TOKENS, max_len - prompt_tokens)
  if fitting < 1:
    raise JaxgptError(f'the prompt is {prompt_tokens} tokens and fills the model\'s context of {max_len}: no room is '
                      'left to generate. Shorten the prompt, or set --max_new_tokens to keep only its end.')
  if fitting == DEFAULT_MAX_NEW_TOKENS:
    return fitting, ''
  return fitting, (f'max_new_tokens={fitting}: as many as fit after the {prompt_tokens}-token prompt in the '
                   f'model\'s context of {max_len} tokens (set --max_new_tokens to choose).')


def encode_prompt(tokenizer, text: str) -> list[int]:
  """The token ids the model continues for a text prompt: BOS, then the text."""
  return [tokenizer.bos_id, *tokenizer.encode(text)]


def _start(model: GPT, prompts, samplings, stop_tokens):
  """The decode state before prefill: buffers on the host, shapes rounded up."""
  max_len = model.cfg.max_len
  for s in samplings:
    _check_fits(s.max_new_tokens, max_len)
  # The model sees at most max_len tokens: keep the end of a prompt that is too long.
  prompts = [list(p)[-(max_len - s.max_new_tokens):] for p, s in zip(prompts, samplings)]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise JaxgptError('a prompt is empty after tokenization; give at least one token.')
  B = len(prompts)
  S = min(max_len, _pow2_at_least(max(len(p) + s.max_new_tokens for p, s in zip(prompts, samplings)), 16))
  tokens_BxS = np.zeros((B, S), np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BxS[row, :len(prompt)] = prompt
  # Stop sequences, right-aligned in a B x N x L table; -1 pads (matches anything).
  N = _pow2_at_least(max(len(rows) for rows in stop_tokens))
  L = _pow2_at_least(max((len(seq) for rows in stop_tokens for seq in rows), default=1))
  stop_BxNxL = np.full((B, N, L), -1, np.int32)
  for row, sequences in enumerate(stop_tokens):
    for n, seq in enumerate(sequences):
      if seq:
        stop_BxNxL[row, n, L - len(seq[-L:]):] = seq[-L:]
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  decode_state = {
      'tokens': tokens_BxS, 'lengths': lengths_B, 'prompt_lengths': lengths_B.copy(),
      'max_new': np.array([s.max_new_tokens for s in samplings], np.int32),
      'temperature': np.array([s.temperature for s in samplings], np.float32),
      'top_k': np.array([s.top_k for s in samplings], np.int32),
      'top_p': np.array([s.top_p for s in samplings], np.float32),
      'seed': np.array([s.seed for s in samplings], np.uint32),
      'stop': stop_BxNxL, 'stopped': np.zeros(B, bool), 'done': np.zeros(B, bool),
      'step': np.zeros((), np.int32),
  }
  if any(s.logprobs is not None for s in samplings):  # per position: the token's log-prob and the likeliest K
    K = min(MAX_TOP_LOGPROBS, model.cfg.vocab_size)
    decode_state.update(logprob=np.zeros((B, S), np.float32), top_ids=np.zeros((B, S, K), np.int32),
                        top_logprob=np.zeros((B, S, K), np.float32))
  prefill_len = min(S, _pow2_at_least(int(lengths_B.max()), 16))
  return decode_state, prefill_len


def _batch_ways() -> int:
  """How many ways the mesh in use (`sharding.activation_rules`) splits a batch; 1 outside a mesh."""
  mesh = jax.sharding.get_mesh()
  axes = () if mesh.empty else nn.logical_to_mesh_axes(('act_batch',))[0] or ()
  return int(np.prod([mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes)]))


def _on_devices(model: GPT, host_state: dict, use_cache: bool) -> dict:
  """The decode state, with an empty KV cache if asked, on the devices.

  On the mesh in use, rows (and the cache's) are split as the batch is, and the cache's kv heads
  as the heads are, so the cache is never whole on one device.
  """
  B, S = host_state['tokens'].shape
  make_cache = lambda: init_cache(model.cfg, B, S)
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return {**host_state, 'cache': make_cache()} if use_cache else host_state
  rows = NamedSharding(mesh, nn.logical_to_mesh_axes(('act_batch',)))
  decode_state = sharding.put_global(host_state, {k: NamedSharding(mesh, P()) if v.ndim == 0 else rows
                                                  for k, v in host_state.items()})
  if use_cache:  # one B x G x S x K array per layer, made in place
    cache_axes = NamedSharding(mesh, nn.logical_to_mesh_axes(CACHE_AXES))
    decode_state['cache'] = jax.jit(make_cache, out_shardings={'key': cache_axes, 'value': cache_axes})()
  return decode_state


def sample_tokens(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B):
  """One token per row with that row's settings; temperature 0 rows are greedy.

  Work that no row needs is skipped (lax.cond): a batch of greedy rows takes only
  the argmax, and rows without top-k or top-p draw from all the logits.
  """
  greedy_B = jax.lax.top_k(logits_BxV, 1)[1][:, 0]  # argmax's first index too; XLA:CPU's argmax is 2x slower
  sampling_B = temperature_B > 0
  top_k_B, top_p_B = jnp.where(sampling_B, top_k_B, 0), jnp.where(sampling_B, top_p_B, 1.0)  # greedy rows: unused

  def sample():
    scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    filtering = ((top_k_B > 0) | (top_p_B < 1)).any()
    cutoff_Bx1 = jax.lax.cond(filtering, lambda: _cutoffs(scaled_BxV, top_k_B, top_p_B),
                              lambda: jnp.full((len(scaled_BxV), 1), -jnp.inf, scaled_BxV.dtype))
    masked_BxV = jnp.where(scaled_BxV < cutoff_Bx1, -jnp.inf, scaled_BxV)
    return jax.vmap(jax.random.categorical)(keys_B, masked_BxV).astype(jnp.int32)

  return jnp.where(sampling_B, jax.lax.cond(sampling_B.any(), sample, lambda: greedy_B), greedy_B)


def _cutoffs(scaled_BxV, top_k_B, top_p_B, candidates: int = 64):
  """Per row, the smallest logit that top-k and top-p keep (-inf where they keep every token).

  Both are read off the logits in descending order: the k-th, and the first whose
  cumulative probability reaches top_p. Sorting the whole vocabulary costs XLA:CPU
  more than the rest of a decode step, so only the `candidates` largest are found
  (lax.top_k) unless some row's cut-off lies beyond them.
  """
  V = scaled_BxV.shape[-1]
  log_total_Bx1 = jax.nn.logsumexp(scaled_BxV, axis=-1, keepdims=True)

  def cutoff(descending_BxN):
    N = descending_BxN.shape[-1]
    kth_Bx1 = jnp.take_along_axis(descending_BxN, jnp.clip(top_k_B - 1, 0, N - 1)[:, None], axis=-1)
    cumulative_BxN = jnp.cumsum(jnp.exp(descending_BxN - log_total_Bx1), axis=-1)
    last_B = jnp.minimum(jnp.sum(cumulative_BxN < top_p_B[:, None], axis=-1), N - 1)
    nucleus_Bx1 = jnp.take_along_axis(descending_BxN, last_B[:, None], axis=-1)
    return jnp.maximum(jnp.where(top_k_B[:, None] > 0, kth_Bx1, -jnp.inf),
                       jnp.where(top_p_B[:, None] < 1, nucleus_Bx1, -jnp.inf)), cumulative_BxN[:, -1]

  top_BxC = jax.lax.top_k(scaled_BxV, min(candidates, V))[0]
  cutoff_Bx1, mass_B = cutoff(top_BxC)
  within = ((top_k_B <= top_BxC.shape[-1]) & ((top_p_B >= 1) | (mass_B >= top_p_B))).all()
  return jax.lax.cond(within, lambda: cutoff_Bx1, lambda: cutoff(_descending(scaled_BxV))[0])


def _descending(x_BxV):
  """float32 rows sorted in descending order, as integers: XLA:CPU sorts int32 4x faster than floats.

  Flipping the low 31 bits of negative floats orders their bit patterns as the
  floats; `~` (-k - 1) reverses that order without overflow, so an ascending
  sort of `~keys` is descending, and the same two steps map the keys back.
  """
  bits = jax.lax.bitcast_convert_type(x_BxV.astype(jnp.float32), jnp.int32)
  keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  keys = ~jnp.sort(~keys, axis=-1)
  return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ 0x7FFFFFFF, keys), jnp.float32)


def _ends_with_stop(tokens_BxS, lengths_B, prompt_lengths_B, stop_BxNxL):
  """Whether each row's generated tokens now end with one of its stop sequences."""
  L = stop_BxNxL.shape[-1]
  index_BxL = lengths_B[:, None] - L + jnp.arange(L)
  window_BxL = jnp.take_along_axis(tokens_BxS, jnp.maximum(index_BxL, 0), axis=1)
  generated_BxL = index_BxL >= prompt_lengths_B[:, None]
  matches_BxNxL = (stop_BxNxL == -1) | ((window_BxL[:, None] == stop_BxNxL) & generated_BxL[:, None])
  has_stop_BxN = (stop_BxNxL != -1).any(-1)
  return (matches_BxNxL.all(-1) & has_stop_BxN).any(-1)


def _last_logits(logits_BxTxV, lengths_B):
  return jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


def _with_logprobs(decode_state, logits_BxTxV, tokens_BxT, positions_BxT):
  """The state with the log-probs of `tokens_BxT` (and the likeliest tokens') written at `positions_BxT`."""
  logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  top_BxTxK, top_ids_BxTxK = jax.lax.top_k(logprobs_BxTxV, decode_state['top_ids'].shape[-1])
  chosen_BxT = jnp.take_along_axis(logprobs_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]
  rows_Bx1 = jnp.arange(len(tokens_BxT))[:, None]
  written = {'logprob': chosen_BxT, 'top_ids': top_ids_BxTxK, 'top_logprob': top_BxTxK}
  return {**decode_state, **{k: decode_state[k].at[rows_Bx1, positions_BxT].set(v) for k, v in written.items()}}


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _prefill(model, params, decode_state, prefill_len, prompt_logprobs=False):
  """Runs the prompts (the first `prefill_len` tokens of the buffer) through the model at once.

  With a cache, a causal pass over the prompts alone, layers scanned as in
  training (compile time does not grow with depth), gives every layer's keys
  and values for the cache's first slots. `prompt_logprobs`: the log-probs of
  the prompts' tokens too.
  """
  tokens_BxT = decode_state['tokens'][:, :prefill_len]
  if 'cache' not in decode_state:
    logits_BxTxV = model.apply({'params': params}, tokens_BxT)
  else:
    logits_BxTxV, kv = model.apply({'params': params}, tokens_BxT, prefill=True)
    decode_state = {**decode_state, 'cache': {
        name: tuple(jax.lax.dynamic_update_slice(layer, new, (0, 0, 0, 0))
                    for layer, new in zip(decode_state['cache'][name], kv[name])) for name in kv}}
  if prompt_logprobs:  # position t holds the log-prob of token t given those before it
    decode_state = _with_logprobs(decode_state, logits_BxTxV[:, :-1], tokens_BxT[:, 1:],
                                  jnp.arange(1, prefill_len)[None])
  return {**decode_state, 'logits': _last_logits(logits_BxTxV, decode_state['lengths'])}


def _next_logits(model, params, decode_state, next_B):
  """Logits after each row's last token (`next_B`, just written), and the state with its cache updated.

  With a cache only that token runs through the model; without one the whole
  buffer does, which is what the cache saves (kept for tests).
  """
  if 'cache' not in decode_state:
    return _last_logits(model.apply({'params': params}, decode_state['tokens']), decode_state['lengths']), decode_state
  logits_Bx1xV, cache = model.apply({'params': params}, next_B[:, None],
                                    positions_BxT=(decode_state['lengths'] - 1)[:, None], cache=decode_state['cache'])
  return logits_Bx1xV[:, 0], {**decode_state, 'cache': cache}


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(model, params, decode_state, until_step):
  """Samples and feeds one token per unfinished row until all are done or `until_step`."""
  model, params = unscanned(model, params)  # outside the loop: its copy of the weights is made once per call
  rows_B = jnp.arange(decode_state['tokens'].shape[0])

  def step(s):
    lengths_B, done_B = s['lengths'], s['done']
    keys_B = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(
        s['seed'], lengths_B)
    next_B = sample_tokens(s['logits'], keys_B, s['temperature'], s['top_k'], s['top_p'])
    if 'logprob' in s:
      s = _with_logprobs(s, s['logits'][:, None], next_B[:, None], lengths_B[:, None])
    tokens_BxS = s['tokens'].at[rows_B, lengths_B].set(jnp.where(done_B, s['tokens'][rows_B, lengths_B], next_B))
    new_lengths_B = lengths_B + ~done_B
    stopped_B = s['stopped'] | (~done_B & _ends_with_stop(tokens_BxS, new_lengths_B, s['prompt_lengths'], s['stop']))
    s = {**s, 'tokens': tokens_BxS, 'lengths': new_lengths_B, 'stopped': stopped_B,
         'done': stopped_B | (new_lengths_B - s['prompt_lengths'] >= s['max_new']), 'step': s['step'] + 1}
    # A finished row feeds a token at its last position too: harmless, as nothing reads that row again.
    logits_BxV, s = _next_logits(model, params, s, next_B)
    return {**s, 'logits': logits_BxV}

  return jax.lax.while_loop(lambda s: ~s['done'].all() & (s['step'] < until_step), step, decode_state)


def stream(model: GPT, params, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling], *,
           eos_id: int, stop_tokens: Sequence[Sequence[Sequence[int]]] | None = None, use_cache: bool = True,
           chunk: int = 0) -> Iterator[list[Continuation]]:
  """Yields, every `chunk` decode steps (0: only at the end), each row's new tokens since the last yield.

  `prompts` are token ids; `stop_tokens[row]` lists token sequences that end
  that row, as EOS always does. Stop sequences and EOS are never yielded. A
  row's finish_reason is set in the yield where it finishes, else None. Rows
  whose Sampling asks for log-probs get them with their tokens (and their
  prompt's in the first yield).
  """
  samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
  stops = [[*map(list, rows), [eos_id]] for rows in (stop_tokens or [[]] * len(prompts))]
  # A mesh splits the batch N ways: padding rows (one token, done after one step) make it a multiple of N.
  num_rows, padding = len(prompts), -len(prompts) % _batch_ways()
  prompts = [*prompts, *[[eos_id]] * padding]
  samplings, stops = samplings + [Sampling(max_new_tokens=1)] * padding, stops + [[[eos_id]]] * padding
  host_state, prefill_len = _start(model, prompts, samplings, stops)
  decode_state = _prefill(model, params, _on_devices(model, host_state, use_cache), prefill_len,
                          any(s.prompt_logprobs for s in samplings))
  fetched = ('tokens', 'lengths', 'stopped', 'done', *(('logprob', 'top_ids', 'top_logprob')
                                                         if 'logprob' in host_state else ()))
  # Tokens that may be the start of a stop sequence are held back until it is clear they are not.
  held_back = max(len(seq) for rows in stops for seq in rows) - 1
  emitted_B = host_state['prompt_lengths'].copy()
  finished_B = np.zeros(len(prompts), bool)
  chunk = chunk or max(s.max_new_tokens for s in samplings)
  first = True
  while not finished_B.all():
    decode_state = _decode(model, params, decode_state, decode_state['step'] + chunk)
    host = sharding.to_host({k: decode_state[k] for k in fetched})
    deltas = []
    for row, (tokens_S, length, stopped, done) in enumerate(
        zip(host['tokens'], host['lengths'], host['stopped'], host['done'])):
      if finished_B[row]:
        deltas.append(Continuation([], None))
        continue
      if done:
        end = _without_stop(tokens_S[:length], stops[row]) if stopped else length
      else:
        end = length - held_back
      end = max(end, emitted_B[row])
      delta = Continuation(tokens_S[emitted_B[row]:end].tolist(), None if not done else 'stop' if stopped else 'length')
      if (top := samplings[row].logprobs) is not None:
        delta.logprobs = _token_logprobs(host, row, emitted_B[row], end, top)
        if first and samplings[row].prompt_logprobs:
          delta.prompt_logprobs = _token_logprobs(host, row, 1, host_state['prompt_lengths'][row], top)
      deltas.append(delta)
      emitted_B[row], finished_B[row] = end, done
    first = False
    yield deltas[:num_rows]


def _token_logprobs(host: dict, row: int, start: int, end: int, top: int) -> list[TokenLogprob]:
  """The log-probs of a row's tokens at positions [start, end), with `top` alternatives each."""
  return [TokenLogprob(int(host['tokens'][row, i]), float(host['logprob'][row, i]),
                       tuple(zip(host['top_ids'][row, i, :top].tolist(), host['top_logprob'][row, i, :top].tolist())))
          for i in range(start, end)]


def _without_stop(row_tokens, stop_sequences) -> int:
  """The row's length without the stop sequence it ends with."""
  for seq in stop_sequences:
    if len(row_tokens) >= len(seq) and row_tokens[len(row_tokens) - len(seq):].tolist() == seq:
      return len(row_tokens) - len(seq)
  return len(row_tokens)


def generate(model: GPT, params, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling], *,
             eos_id: int, stop_tokens=None, use_cache: bool = True) -> list[Continuation]:
  """Continues each prompt (token ids); see `stream` for the arguments."""
  results = [Continuation([], None) for _ in prompts]
  for deltas in stream(model, params, prompts, sampling, eos_id=eos_id, stop_tokens=stop_tokens,
                       use_cache=use_cache):
    for result, delta in zip(results, deltas):
      result.tokens += delta.tokens
      result.finish_reason = result.finish_reason or delta.finish_reason
      if delta.logprobs is not None:
        result.logprobs = (result.logprobs or []) + delta.logprobs
      result.prompt_logprobs = result.prompt_logprobs or delta.prompt_logprobs
  return results


# --- text in, text out ----------------------------------------------------

_CONTEXT_TOKENS = 8  # tokens before one that decide how it reads (a leading space, the rest of a character)


@dataclasses.dataclass(frozen=True)
class TextLogprob:
  """A TokenLogprob as text: the text the token adds where it stands, and the likeliest tokens' texts there."""
  text: str
  logprob: float
  top: tuple[tuple[str, float], ...]


@dataclasses.dataclass
class TextContinuation:
  text: str
  finish_reason: str | None  # 'stop', 'length', or None while the row is still running
  num_tokens: int = 0
  logprobs: list[TextLogprob] | None = None  # the tokens of `text`, when the row's Sampling asks for log-probs
  prompt_logprobs: list[TextLogprob] | None = None  # the prompt's tokens after BOS: in the first yield only


def stream_text(model: GPT, params, tokenizer, prompts: Sequence[str | Sequence[int]],
                sampling: Sampling | Sequence[Sampling], *, chunk: int = 0) -> Iterator[list[TextContinuation]]:
  """`stream` for text: yields each row's new text; stop strings end a row and are cut off.

  A prompt is text (encoded after BOS) or token ids, used as they are. Stop
  strings also stop the decode loop as token sequences; a stop string the
  model spells with other tokens is still found in the text, and cut there.
  """
  samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
  prompt_ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
  stop_tokens = [[tokenizer.encode(text) for text in s.stop if text] for s in samplings]
  rows = [_TextRow(tokenizer, ids, s) for ids, s in zip(prompt_ids, samplings)]
  for deltas in stream(model, params, prompt_ids, samplings, eos_id=tokenizer.eos_id, stop_tokens=stop_tokens,
                       chunk=chunk):
    yield [row.advance(delta) for row, delta in zip(rows, deltas)]


class _TextRow:
  """One row of `stream_text`: its tokens, the text sent so far, and log-probs waiting for their text to be sent."""

  def __init__(self, tokenizer, prompt_ids: list[int], sampling: Sampling):
    self.tokenizer, self.prompt_ids, self.stops = tokenizer, prompt_ids, sampling.stop
    self.tokens, self.sent, self.finished = [], '', False
    self.waiting, self.sent_logprob_chars = [], 0  # TextLogprobs not sent yet; the text length of those sent

  def advance(self, delta: Continuation) -> TextContinuation:
    if self.finished:
      return TextContinuation('', None, len(self.tokens))
    if delta.logprobs is not None:
      self.waiting += _as_text(self.tokenizer, self.prompt_ids + self.tokens, delta.logprobs)
    self.tokens += delta.tokens
    text, reason = self.tokenizer.decode(self.tokens), delta.finish_reason
    cut = min((i for i in (text.find(stop) for stop in self.stops if stop) if i >= 0), default=-1)
    if cut >= 0:
      text, reason = text[:cut], 'stop'
    elif reason is None:
      # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
      text = text.rstrip('\ufffd')
      text = text[:len(text) - _longest_stop_prefix(text, self.stops)]
    new_text = text[len(self.sent):] if text.startswith(self.sent) else ''
    self.sent += new_text
    self.finished = reason is not None
    result = TextContinuation(new_text, reason, len(self.tokens))
    if delta.logprobs is not None:
      result.logprobs = self._logprobs_sent(cut_short=cut >= 0)
    if delta.prompt_logprobs is not None:
      result.prompt_logprobs = _as_text(self.tokenizer, self.prompt_ids[:1], delta.prompt_logprobs)
    return result

  def _logprobs_sent(self, cut_short: bool) -> list[TextLogprob]:
    """The waiting log-probs whose text is now sent: at the end all of them, or those before a stop string's cut."""
    out = []
    while self.waiting:
      start, end = self.sent_logprob_chars, self.sent_logprob_chars + len(self.waiting[0].text)
      if not (end <= len(self.sent) or self.finished and (not cut_short or start < len(self.sent))):
        break
      out.append(self.waiting.pop(0))
      self.sent_logprob_chars = end
    return out


def _as_text(tokenizer, context: list[int], entries: list[TokenLogprob]) -> list[TextLogprob]:
  """The tokens of `entries` as text, each read after `context` and the entries before it."""
  ids, out = list(context), []
  for entry in entries:
    window = ids[-_CONTEXT_TOKENS:]
    before = tokenizer.decode(window)

    def piece(token: int) -> str:
      text = tokenizer.decode(window + [token])
      return text[len(before):] if text.startswith(before) else tokenizer.decode([token])

    out.append(TextLogprob(piece(entry.token), entry.logprob, tuple((piece(t), lp) for t, lp in entry.top)))
    ids.append(entry.token)
  return out


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
  """Length of the longest end of `text` that is the beginning of a stop string."""
  return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


def complete(model: GPT, params, tokenizer, prompts: Sequence[str | Sequence[int]],
             sampling: Sampling | Sequence[Sampling]) -> list[TextContinuation]:
  """Continues each prompt (see `stream_text`); returns the new text of each."""
  results = [TextContinuation('', None) for _ in prompts]
  for deltas in stream_text(model, params, tokenizer, prompts, sampling):
    for result, delta in zip(results, deltas):
      result.text += delta.text
      result.finish_reason = result.finish_reason or delta.finish_reason
      result.num_tokens = delta.num_tokens
      if delta.logprobs is not None:
        result.logprobs = (result.logprobs or []) + delta.logprobs
      result.prompt_logprobs = result.prompt_logprobs or delta.prompt_logprobs
  return results


# --- command line ---------------------------------------------------------

def _define_flags() -> None:
  # Defined only when this module runs as a command, so importing `generate` adds no flags.
  flags.DEFINE_string('workdir', None, 'The run directory written by jaxgpt.train.')
  flags.DEFINE_multi_string('prompt', ['def '], 'Prompt text; repeat the flag for several prompts.')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per prompt (default: as many as fit in '
                       f'the context, up to {DEFAULT_MAX_NEW_TOKENS}).')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens; 0 for all.')
  flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens holding this probability; 1 for all.')
  flags.DEFINE_multi_string('stop', [], 'Text that ends a continuation; repeat for several.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')
  inference.define_mesh_flags()


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  config, tokenizer = run_dir.load_run(FLAGS.workdir)
  longest_prompt = max(len(encode_prompt(tokenizer, p)) for p in FLAGS.prompt)
  max_new_tokens, note = fitting_max_new_tokens(FLAGS.max_new_tokens, config.model.max_len, longest_prompt)
  sampling = Sampling(max_new_tokens=max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                      top_p=FLAGS.top_p, seed=FLAGS.seed, stop=tuple(FLAGS.stop))
  if note:
    print(note, file=sys.stderr)
  mesh = inference.make_mesh(inference.mesh_flags())
  loaded = inference.load(config, tokenizer, FLAGS.workdir, FLAGS.step, mesh=mesh, dtype=FLAGS.dtype)
  with loaded.activation_rules():
    outputs = complete(loaded.model, loaded.params, tokenizer, FLAGS.prompt, sampling)
  print(f'# step {loaded.step} of {FLAGS.workdir}')
  for prompt, continuation in zip(FLAGS.prompt, outputs):
    print(f'--- prompt: {prompt!r}')
    print(prompt + continuation.text)


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
