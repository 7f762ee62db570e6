"""Decoding benchmark: tokens/s with and without the KV cache.

  python tools/bench_sample.py                      # 4 layers x 256, 256 new tokens
  python tools/bench_sample.py --batch 8 --new_tokens 128

Random parameters in the first quickstart's shape (4 layers, 256 wide, vocab
4096) with a context of 512 so that 256 new tokens fit; greedy decoding with
no EOS so every run produces exactly `new_tokens` per row. Each variant is
compiled first, then timed over several rounds; the median is reported.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxgpt.model import GPT, ModelConfig  # noqa: E402
from jaxgpt.sample import Sampling, generate  # noqa: E402


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  cfg = ModelConfig(vocab_size=4096, max_len=FLAGS.max_len, num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024)
  model = GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  prompts = [[1, *range(10 + row, 10 + row + FLAGS.prompt_len - 1)] for row in range(FLAGS.batch)]
  sampling = Sampling(max_new_tokens=FLAGS.new_tokens)
  print(f'{jax.devices()[0].device_kind}: batch {FLAGS.batch}, prompt {FLAGS.prompt_len} tokens, '
        f'{FLAGS.new_tokens} new tokens, context {cfg.max_len}')
  rates = {}
  for use_cache in (True, False):
    def run():
      outputs = generate(model, params, prompts, sampling, eos_id=-1, use_cache=use_cache)
      assert all(len(o.tokens) == FLAGS.new_tokens for o in outputs)
    run()  # compile
    times = []
    for _ in range(FLAGS.rounds):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    rates[use_cache] = FLAGS.batch * FLAGS.new_tokens / statistics.median(times)
    print(f'{"with" if use_cache else "without"} KV cache: {rates[use_cache]:,.0f} tokens/s '
          f'(median of {FLAGS.rounds}: {statistics.median(times):.2f}s)')
  print(f'speed-up: {rates[True] / rates[False]:.1f}x')


if __name__ == '__main__':
  flags.DEFINE_integer('batch', 1, 'Prompts decoded together.')
  flags.DEFINE_integer('prompt_len', 16, 'Tokens per prompt.')
  flags.DEFINE_integer('new_tokens', 256, 'Tokens generated per prompt.')
  flags.DEFINE_integer('max_len', 512, 'Model context; the cache has this many slots at most.')
  flags.DEFINE_integer('rounds', 3, 'Timed runs per variant.')
  app.run(main)
