"""Text generation from a trained run: `python -m jaxgpt.sample --workdir DIR --prompt "..."`.

Decoding re-runs the model over a fixed-size buffer for every new token, inside
one jitted loop: fixed shapes mean one compilation for any prompt. (A KV cache
is the planned speed-up.) Prompts of different lengths decode together in a batch.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxgpt import state
from jaxgpt.config import JaxgptError, run_cli
from jaxgpt.model import GPT


def generate(model: GPT, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float, top_k: int, eos_id: int, seed: int) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens`, stopping at EOS.

  temperature 0 is greedy; top_k 0 samples from the whole vocabulary.
  """
  max_len = model.cfg.max_len
  keep = max_len - max_new_tokens
  if keep < 1:
    raise JaxgptError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in the '
                      f'{max_len}-token context. Ask for fewer than {max_len} new tokens.')
  prompts = [list(p)[-keep:] for p in prompts]  # the model sees at most max_len tokens
  if any(len(p) == 0 for p in prompts):
    raise JaxgptError('a prompt is empty after tokenization; give at least one token.')
  buffer = np.zeros((len(prompts), max_len), np.int32)
  for row, prompt in enumerate(prompts):
    buffer[row, :len(prompt)] = prompt
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens, lengths = _decode_loop(model, params, jnp.asarray(buffer), jnp.asarray(lengths),
                                 jax.random.key(seed), max_new_tokens, float(temperature),
                                 int(top_k), int(eos_id))
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  return [tokens[r, len(p):lengths[r]].tolist() for r, p in enumerate(prompts)]


def sample_token(logits_BxV, rng, temperature: float, top_k: int):
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_largest = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_largest, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _decode_loop(model, params, tokens_BxT, lengths_B, rng, max_new_tokens, temperature, top_k, eos_id):
  B = tokens_BxT.shape[0]

  def step(i, carry):
    tokens_BxT, lengths_B, done_B = carry
    logits_BxTxV = model.apply({'params': params}, tokens_BxT)
    last_BxV = jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    next_B = sample_token(last_BxV, jax.random.fold_in(rng, i), temperature, top_k).astype(jnp.int32)
    write_B = ~done_B
    tokens_BxT = tokens_BxT.at[jnp.arange(B), lengths_B].set(
        jnp.where(write_B, next_B, tokens_BxT[jnp.arange(B), lengths_B]))
    lengths_B = lengths_B + write_B
    done_B = done_B | (next_B == eos_id)
    return tokens_BxT, lengths_B, done_B

  done_B = jnp.zeros((B,), bool)
  tokens_BxT, lengths_B, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens_BxT, lengths_B, done_B))
  return tokens_BxT, lengths_B


def decode_text(tokenizer, continuation: list[int]) -> str:
  return tokenizer.decode([t for t in continuation if t != tokenizer.eos_id])


# --- command line ---------------------------------------------------------

def _define_flags() -> None:
  # Defined only when this module runs as a command, so importing `generate` adds no flags.
  flags.DEFINE_string('workdir', None, 'The run directory written by jaxgpt.train.')
  flags.DEFINE_multi_string('prompt', ['def '], 'Prompt text; repeat the flag for several prompts.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens; 0 for all.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  config, tokenizer = state.load_run(FLAGS.workdir)
  model, params, step = state.load_params(config, tokenizer, FLAGS.workdir, FLAGS.step)
  prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in FLAGS.prompt]
  outputs = generate(model, params, prompts, max_new_tokens=FLAGS.max_new_tokens,
                     temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                     eos_id=tokenizer.eos_id, seed=FLAGS.seed)
  print(f'# step {step} of {FLAGS.workdir}')
  for prompt, continuation in zip(FLAGS.prompt, outputs):
    print(f'--- prompt: {prompt!r}')
    print(prompt + decode_text(tokenizer, continuation))


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
