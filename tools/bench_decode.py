"""Batched decoding side by side with Hugging Face transformers, and the server under many clients.

  python tools/bench_decode.py                 # jaxgpt vs transformers' generate, batch 1 to 32
  python tools/bench_decode.py --clients 50    # then the server: tokens/s for 1 client and for 50
  python tools/bench_decode.py --logprobs 5    # jaxgpt alone: without and with log-probs (5 alternatives)

The same random GPT-2 weights (4 layers x 256, 4 heads, vocab 4096) in jaxgpt
and in transformers' GPT2LMHeadModel (converted by jaxgpt.hf), 16-token
prompts, 128 new greedy tokens per row and no EOS; the tool fails unless both
produce the same tokens. torch gets as many threads as XLA:CPU uses (one per
core). After a warm-up (compiling), each batch size is timed `rounds` times,
the two libraries taking turns; medians are reported. `--logprobs N` compares
jaxgpt with itself instead: the same decoding without log-probs and with them
(each token's and the N likeliest), taking turns; both must give the same tokens.

The server part starts `python -m jaxgpt.serve` (its default batching unless
`--max_batch` is given) on `--workdir`, or on a run directory it writes with
random parameters in the quickstart's shape (configs/quickstart.py; the
tokenizer trained here on part of Python's standard library), and counts the
completion tokens per second that one client, then `clients` concurrent
clients (httpx), get back.
"""

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from jaxgpt import hf  # noqa: E402
from jaxgpt.model import GPT, ModelConfig, build_model  # noqa: E402
from jaxgpt.sample import Sampling, generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_PROMPTS = ['def ', 'import ', 'class ', 'for i in range(', 'return ', 'if __name__ == ', '# ', 'with open(']

flags.DEFINE_list('batches', ['1', '2', '4', '8', '16', '32'], 'Batch sizes to compare.')
flags.DEFINE_integer('prompt_len', 16, 'Tokens per prompt.')
flags.DEFINE_integer('new_tokens', 128, 'Greedy tokens generated per row.')
flags.DEFINE_integer('rounds', 3, 'Timed runs per batch size and library.')
flags.DEFINE_integer('logprobs', -1, 'N >= 0: time jaxgpt without and with log-probs (N alternatives) instead of '
                     'against transformers.')
flags.DEFINE_integer('clients', 0, 'Concurrent clients of the server part; 0 skips it.')
flags.DEFINE_integer('requests', 2, 'Requests each server client sends, one after another.')
flags.DEFINE_string('workdir', None, 'Run directory the server part serves (default: random weights in the '
                    "quickstart's shape, in a temporary directory).")
flags.DEFINE_integer('max_tokens', 64, 'max_tokens of each server request.')
flags.DEFINE_integer('max_batch', 0, "The server's --max_batch (0: its default).")
flags.DEFINE_float('top_p', 1.0, 'top_p of each server request (temperature is the API\'s default, 1).')
FLAGS = flags.FLAGS


def _seconds(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


# --- jaxgpt against transformers ------------------------------------------------------------------

def gpt2_model(max_len: int):
  """(jaxgpt model, its params): random GPT-2 weights, 4 layers x 256."""
  cfg = ModelConfig(vocab_size=4096, max_len=max_len, num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024)
  model = GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  # A wider spread than GPT-2's init: clear winners among the logits, so float rounding in either
  # library cannot flip a greedy choice between two near-equal tokens.
  return model, jax.tree.map(lambda x: x * 4.0, params)


def gpt2_pair(max_len: int):
  """(jaxgpt model, its params, the same weights in transformers' GPT2LMHeadModel)."""
  import torch
  import transformers
  model, params = gpt2_model(max_len)
  cfg = model.cfg
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf.hf_config(cfg, cfg.vocab_size, 0))).eval()
  missing, unexpected = reference.load_state_dict(
      {name: torch.tensor(t) for name, t in hf.params_to_hf(params, 'gpt2').items()}, strict=False)
  assert set(missing) <= {'lm_head.weight'} and not unexpected, (missing, unexpected)  # lm_head is tied
  reference.generation_config.eos_token_id = None  # no EOS: every row generates exactly new_tokens
  reference.generation_config.pad_token_id = 0
  return model, params, reference


def compare_with_transformers() -> None:
  import torch
  threads = len(os.sched_getaffinity(0))  # XLA:CPU runs one thread per core it may use
  torch.set_num_threads(threads)
  model, params, reference = gpt2_pair(max_len=FLAGS.prompt_len + FLAGS.new_tokens)
  print(f'{jax.devices()[0].device_kind}, {threads} threads each: GPT-2 4 x 256, vocab 4096, '
        f'{FLAGS.prompt_len}-token prompts, {FLAGS.new_tokens} new greedy tokens per row, '
        f'median of {FLAGS.rounds} (jax {jax.__version__}, torch {torch.__version__})')
  print('| batch | jaxgpt tokens/s | transformers tokens/s | jaxgpt / transformers |')
  print('|---|---|---|---|')
  rng = np.random.default_rng(0)
  for batch in map(int, FLAGS.batches):
    prompts = rng.integers(3, 4096, (batch, FLAGS.prompt_len))

    def jaxgpt_tokens():
      outputs = generate(model, params, prompts.tolist(), Sampling(max_new_tokens=FLAGS.new_tokens), eos_id=-1)
      return np.array([o.tokens for o in outputs])

    def transformers_tokens():
      with torch.no_grad():
        ids = torch.from_numpy(prompts)
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=FLAGS.new_tokens,
                                 min_new_tokens=FLAGS.new_tokens, do_sample=False)
      return out[:, FLAGS.prompt_len:].numpy()

    ours, theirs = jaxgpt_tokens(), transformers_tokens()  # warm-up: compiling, first allocations
    if not np.array_equal(ours, theirs):
      rows = np.flatnonzero((ours != theirs).any(-1))
      raise SystemExit(f'batch {batch}: jaxgpt and transformers decode different tokens in rows {rows.tolist()}')
    times = {'jaxgpt': [], 'transformers': []}
    for _ in range(FLAGS.rounds):  # taking turns, so a busy moment of the machine hits both
      times['jaxgpt'].append(_seconds(jaxgpt_tokens))
      times['transformers'].append(_seconds(transformers_tokens))
    rate = {name: batch * FLAGS.new_tokens / statistics.median(t) for name, t in times.items()}
    print(f'| {batch} | {rate["jaxgpt"]:,.0f} | {rate["transformers"]:,.0f} | '
          f'{rate["jaxgpt"] / rate["transformers"]:.2f}x |', flush=True)


def logprobs_cost() -> None:
  model, params = gpt2_model(max_len=FLAGS.prompt_len + FLAGS.new_tokens)
  print(f'{jax.devices()[0].device_kind}: GPT-2 4 x 256, vocab 4096, {FLAGS.prompt_len}-token prompts, '
        f'{FLAGS.new_tokens} new greedy tokens per row, median of {FLAGS.rounds} (jax {jax.__version__})')
  print(f'| batch | jaxgpt tokens/s | with logprobs={FLAGS.logprobs} | with / without |')
  print('|---|---|---|---|')
  rng = np.random.default_rng(0)
  for batch in map(int, FLAGS.batches):
    prompts = rng.integers(3, 4096, (batch, FLAGS.prompt_len)).tolist()
    settings = {'without': Sampling(max_new_tokens=FLAGS.new_tokens),
                'with': Sampling(max_new_tokens=FLAGS.new_tokens, logprobs=FLAGS.logprobs)}
    decode = {name: (lambda s=s: generate(model, params, prompts, s, eos_id=-1)) for name, s in settings.items()}
    if [o.tokens for o in decode['without']()] != [o.tokens for o in decode['with']()]:  # also the warm-up
      raise SystemExit(f'batch {batch}: log-probs changed the tokens decoded')
    times = {name: [] for name in decode}
    for _ in range(FLAGS.rounds):
      for name, run in decode.items():
        times[name].append(_seconds(run))
    rate = {name: batch * FLAGS.new_tokens / statistics.median(t) for name, t in times.items()}
    print(f'| {batch} | {rate["without"]:,.0f} | {rate["with"]:,.0f} | {rate["with"] / rate["without"]:.2f}x |',
          flush=True)


# --- the server -----------------------------------------------------------------------------------

def quickstart_run(workdir: str) -> None:
  """A run directory with the quickstart's config, a tokenizer trained here and random parameters."""
  from configs import quickstart
  from jaxgpt.data.tokenizer import train_tokenizer
  from jaxgpt.state import save_initial_run
  config = quickstart.get_config()
  stdlib = sysconfig.get_paths()['stdlib']
  files = sorted(os.path.join(stdlib, name) for name in os.listdir(stdlib) if name.endswith('.py'))[:200]
  tokenizer = train_tokenizer((open(path, encoding='utf-8', errors='replace').read() for path in files),
                              config.data.vocab_size)
  model = build_model(config, tokenizer.vocab_size)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  save_initial_run(config, tokenizer, params, workdir)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


async def _clients(url: str, clients: int, requests: int) -> tuple[int, float]:
  """(completion tokens, seconds) for `clients` concurrent clients sending `requests` requests each."""
  import httpx

  async def client(index: int, http) -> int:
    tokens = 0
    for n in range(requests):
      body = {'prompt': SERVER_PROMPTS[index % len(SERVER_PROMPTS)], 'max_tokens': FLAGS.max_tokens,
              'top_p': FLAGS.top_p, 'seed': index * requests + n}
      response = await http.post(f'{url}/v1/completions', json=body)
      response.raise_for_status()
      tokens += response.json()['usage']['completion_tokens']
    return tokens

  async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
    start = time.perf_counter()
    tokens = await asyncio.gather(*(client(i, http) for i in range(clients)))
    return sum(tokens), time.perf_counter() - start


def serve_under_load() -> None:
  import httpx
  with tempfile.TemporaryDirectory() as scratch:
    workdir = os.path.abspath(FLAGS.workdir) if FLAGS.workdir else scratch
    if not FLAGS.workdir:
      quickstart_run(workdir)
    port = _free_port()
    log = open(os.path.join(scratch, 'server.log'), 'w+')  # a file, not a pipe that a chatty server could fill
    batching = [f'--max_batch={FLAGS.max_batch}'] if FLAGS.max_batch else []
    server = subprocess.Popen([sys.executable, '-m', 'jaxgpt.serve', '--workdir', workdir, '--port', str(port),
                               *batching], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
      deadline = time.time() + 300
      while True:
        if server.poll() is not None:
          log.seek(0)
          raise SystemExit(f'the server exited: {log.read()[-3000:]}')
        try:
          if httpx.get(f'{url}/health', timeout=1).status_code == 200:
            break
        except httpx.TransportError:
          if time.time() > deadline:
            raise SystemExit('the server did not answer /health within 300 s') from None
          time.sleep(0.5)
      asyncio.run(_clients(url, 1, 1))  # compiles the decode loop
      print(f'\nserver ({FLAGS.workdir or "quickstart shape, random weights"}; '
            f'{f"--max_batch={FLAGS.max_batch}" if FLAGS.max_batch else "its default batching"}): '
            f'requests of {FLAGS.max_tokens} tokens, temperature 1, top_p {FLAGS.top_p}')
      for clients, requests in ((1, 2 * FLAGS.requests), (FLAGS.clients, FLAGS.requests)):
        tokens, seconds = asyncio.run(_clients(url, clients, requests))
        print(f'{clients} client(s) x {requests} requests: {tokens / seconds:,.0f} tokens/s '
              f'({tokens} tokens in {seconds:.1f} s)', flush=True)
    finally:
      server.terminate()
      server.wait(timeout=30)
      log.close()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's and httpx's progress lines would bury the figures
  if FLAGS.logprobs >= 0:
    logprobs_cost()
  else:
    compare_with_transformers()
  if FLAGS.clients:
    serve_under_load()


if __name__ == '__main__':
  app.run(main)
