"""Training-step benchmark: step time, tokens/s, MFU, compile time, memory.

  python tools/bench.py --preset mid --preset tiny   # the figures in docs/performance.md
  python tools/bench.py --config configs/quickstart.py --config.model.remat=full
  python tools/bench.py --preset mid --sweep remat   # memory against speed per remat policy
  python tools/bench.py --sweep depth                # compile time, 12 vs 48 layers, scan on/off

It builds the train step exactly as jaxgpt.train does (same state, shardings,
donation) and feeds random tokens, so it measures the model and the step,
not the input pipeline (tools/bench_data.py does that). MFU is model FLOPs
(jaxgpt.model.flops_per_token, attention included) over the device's peak:
the vendor figure for TPUs/GPUs, a float32 matmul measured on the spot on CPU.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags  # noqa: E402

from jaxgpt import sharding, state as state_lib  # noqa: E402
from jaxgpt.config import base_config, define_config_flag, run_cli  # noqa: E402
from jaxgpt.data.pipeline import random_batch  # noqa: E402
from jaxgpt.metrics import model_flops_utilization, peak_flops_per_device  # noqa: E402
from jaxgpt.model import build_model, flops_per_token  # noqa: E402
from jaxgpt.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxgpt.train import make_train_step  # noqa: E402

# The shapes issue #8 names; the vocabulary is fixed here because no tokenizer is trained.
PRESETS = {
    'tiny': dict(num_layers=4, embed_dim=128, num_heads=4, mlp_dim=512, seq_len=64, batch_size=12, vocab=8192),
    'mid': dict(num_layers=8, embed_dim=512, num_heads=8, mlp_dim=2048, seq_len=256, batch_size=8, vocab=8192),
    # The first quickstart's shape (GPT-2, 4 x 256); configs/quickstart.py is now narrower.
    'small': dict(num_layers=4, embed_dim=256, num_heads=4, mlp_dim=1024, seq_len=128, batch_size=16, vocab=4096),
}


def preset_config(name: str):
  p = PRESETS[name]
  c = base_config()
  c.seq_len, c.batch_size = p['seq_len'], p['batch_size']
  c.data.vocab_size = p['vocab']
  c.model.update(num_layers=p['num_layers'], embed_dim=p['embed_dim'], num_heads=p['num_heads'],
                 mlp_dim=p['mlp_dim'], max_len=p['seq_len'])
  return c


def _batch(config, step: int) -> dict:
  return random_batch(config.batch_size, config.seq_len, config.data.vocab_size, seed=step)


def measure(config, peak: float, steps: int = 10, rounds: int = 3) -> dict:
  """Compiles the train step for `config`, then times `rounds` x `steps` steps (median per round)."""
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, config.data.vocab_size)
  tx = make_optimizer(config.optim, 1000)
  state = state_lib.create_state(model, tx, config.seq_len, mesh, jax.random.key(0))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, 1000),
                                    config.optim.grad_accum_steps),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  batches = [sharding.global_batch(_batch(config, i), mesh) for i in range(2)]
  with sharding.activation_rules(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, batches[0])  # warm-up
    jax.block_until_ready(metrics)
    per_round = []
    for r in range(rounds):
      start = time.perf_counter()
      for i in range(steps):
        state, metrics = compiled(state, batches[i % 2])
      jax.block_until_ready(metrics)
      per_round.append((time.perf_counter() - start) / steps)
  step_s = statistics.median(per_round)
  tokens_per_s = config.batch_size * config.seq_len / step_s
  flops = flops_per_token(model.cfg, config.seq_len)
  return {
      'step_ms': 1000 * step_s, 'tokens_per_s': tokens_per_s, 'flops_per_token': flops,
      'mfu': model_flops_utilization(flops, tokens_per_s, peak, jax.device_count()),
      'compile_s': compile_s,
      'temp_mib': memory.temp_size_in_bytes / 2**20 if memory else float('nan'),
      'loss': float(metrics['loss']),
  }


def compile_seconds(config) -> float:
  """Time to trace, lower and compile the train step alone (no run)."""
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, config.data.vocab_size)
  tx = make_optimizer(config.optim, 1000)
  abstract = state_lib.abstract_state(model, tx, config.seq_len, mesh)
  step_fn = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, 1000), 1))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(config, 0))
  with sharding.activation_rules(mesh):
    start = time.perf_counter()
    step_fn.lower(abstract, batch).compile()
    return time.perf_counter() - start


def _row(name: str, r: dict) -> str:
  return (f'{name:<22} {r["step_ms"]:9.1f} {r["tokens_per_s"]:11,.0f} {r["flops_per_token"] / 1e6:10.1f} '
          f'{100 * r["mfu"]:6.1f}% {r["compile_s"]:8.1f} {r["temp_mib"]:9.1f}')


HEADER = f'{"run":<22} {"step ms":>9} {"tokens/s":>11} {"MFLOP/tok":>10} {"MFU":>7} {"compile s":>8} {"temp MiB":>9}'


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = FLAGS.config if FLAGS.config is not None else preset_config(FLAGS.preset[0])
  print(f'jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}')
  if FLAGS.sweep == 'depth':
    print(f'{"layers":>6} {"scan":>5} {"compile s":>10}')
    for scan in (True, False):
      for layers in (12, 48):
        c = preset_config('tiny')
        c.model.update(num_layers=layers, scan_layers=scan)
        print(f'{layers:>6} {str(scan):>5} {compile_seconds(c):10.2f}')
    return
  # Measured first, on an idle process: the CPU peak is the best matmul rate seen.
  peak, source = peak_flops_per_device(config.train.peak_flops_per_device)
  print(f'peak {peak / 1e9:.0f} GFLOP/s per device ({source})')
  print(HEADER)
  if FLAGS.sweep == 'remat':
    for policy in ('none', 'dots', 'offload', 'full'):
      config.model.remat = policy
      print(_row(f'remat={policy}', measure(config, peak, FLAGS.steps, FLAGS.rounds)), flush=True)
    return
  if FLAGS.config is not None:
    print(_row('config', measure(config, peak, FLAGS.steps, FLAGS.rounds)))
  for name in FLAGS.preset if FLAGS.config is None else ():
    print(_row(name, measure(preset_config(name), peak, FLAGS.steps, FLAGS.rounds)), flush=True)


def cli():
  define_config_flag()
  flags.DEFINE_multi_enum('preset', ['mid'], list(PRESETS),
                          'Shapes to benchmark when --config is not given; repeat the flag to compare several '
                          'side by side, against one peak measurement.')
  flags.DEFINE_enum('sweep', None, ['remat', 'depth'], 'Compare remat policies, or compile time by depth.')
  flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
  flags.DEFINE_integer('rounds', 3, 'Rounds; the median round is reported.')
  run_cli(main)


if __name__ == '__main__':
  cli()
