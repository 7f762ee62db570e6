"""Plan a run before paying for it: parameters, FLOPs, and per-device memory.

  python tools/plan.py --config configs/gpt2_small.py --devices 8
  python tools/plan.py --config configs/llama_1b.py --devices 16 --config.mesh.tensor=2 --device 'TPU v5e'

Shards every parameter exactly as training would (the model's logical axes
through the config's rules onto the mesh), then estimates activation memory
for each remat policy with the standard per-layer formulas (Korthikanti et
al. 2022). Needs no accelerator: shapes only.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from jaxgpt import sharding  # noqa: E402
from jaxgpt.config import define_config_flag, require_config, run_cli  # noqa: E402
from jaxgpt.model import GPT, ModelConfig, flops_per_token  # noqa: E402

# Memory per device, GiB.
DEVICE_MEMORY = {
    'TPU v4': 32, 'TPU v5e': 16, 'TPU v5p': 95, 'TPU v6e': 32,
    'A100 40GB': 40, 'A100 80GB': 80, 'H100': 80, 'H200': 141,
}
GiB = 2**30


def _sharded_bytes(abstract_params, specs, mesh_sizes: dict, rules) -> int:
  """Bytes of float32 parameters one device holds under the logical rules."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    mesh_axes = nn.logical_to_mesh_axes(spec, rules)
    split = 1
    for axes in mesh_axes:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        split *= mesh_sizes.get(axis, 1) if axis else 1
    total += math.prod(leaf.shape) * 4 // split
  return total


def activation_bytes(cfg: ModelConfig, seq_len: int, local_batch: int, tensor: int, remat: str) -> int:
  """Activation memory kept for the backward pass, per device (an estimate)."""
  bytes_per = jnp.dtype(cfg.dtype).itemsize
  D, H, T, L = cfg.embed_dim, cfg.num_heads, seq_len, cfg.num_layers
  tokens = local_batch * T
  # Per layer and token, in units of D elements: norms/residuals (10), matmul outputs (24, split
  # by tensor parallelism), attention probabilities (5 * H * T / D, also split).
  matmul_outputs = 10 + 24 / tensor
  scores = 5 * H * T / (D * tensor)
  per_layer = {'none': matmul_outputs + scores, 'dots': matmul_outputs, 'full': 2}[remat]
  layers = L * per_layer * tokens * D * bytes_per / 2
  if remat != 'none':  # the layer being recomputed holds its full activations once
    layers += (matmul_outputs + scores) * tokens * D * bytes_per / 2
  logits = 2 * tokens * cfg.vocab_size * 4 / tensor  # float32 logits and their gradient
  return int(layers + logits)


def plan(config, num_devices: int) -> dict:
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  rules = sharding.logical_rules(config.mesh)
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size, backend='accelerator')  # plans are for GPU/TPU
  boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  params = nn.unbox(boxed)
  param_bytes = _sharded_bytes(params, nn.get_partition_spec(boxed), sizes, rules)
  sharding.check_divisibility(config, sizes)
  local_batch = config.batch_size // sharding.data_parallel_size(sizes) // config.optim.grad_accum_steps
  return {
      'mesh': sizes,
      'params': sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
      'flops_per_token': flops_per_token(cfg, config.seq_len),
      'param_bytes': param_bytes,
      'optimizer_bytes': 2 * param_bytes,  # Adam's two moments, sharded like the params
      'gradient_bytes': param_bytes,
      'activation_bytes': {r: activation_bytes(cfg, config.seq_len, local_batch, sizes['tensor'], r)
                           for r in ('none', 'dots', 'full')},
      'remat': cfg.remat,
  }


def main(argv):
  del argv
  config = require_config(flags.FLAGS.config)
  p = plan(config, flags.FLAGS.devices)
  fixed = p['param_bytes'] + p['optimizer_bytes'] + p['gradient_bytes']
  print(f'mesh {p["mesh"]} on {flags.FLAGS.devices} devices')
  print(f'parameters      {p["params"] / 1e6:,.1f}M   training FLOPs/token {p["flops_per_token"] / 1e9:.2f} G')
  print('per device (GiB):')
  print(f'  params (fp32)        {p["param_bytes"] / GiB:8.2f}')
  print(f'  optimizer (Adam)     {p["optimizer_bytes"] / GiB:8.2f}')
  print(f'  gradients            {p["gradient_bytes"] / GiB:8.2f}')
  for remat, act in p['activation_bytes'].items():
    mark = '  <- config' if remat == p['remat'] else ''
    print(f'  activations remat={remat:<5} {act / GiB:8.2f}   total {(fixed + act) / GiB:8.2f}{mark}')
  total = fixed + p['activation_bytes'][p['remat']]
  for name, gib in DEVICE_MEMORY.items():
    if flags.FLAGS.device and not name.startswith(flags.FLAGS.device):
      continue
    verdict = 'fits' if total < 0.9 * gib * GiB else 'DOES NOT FIT'  # XLA needs headroom
    print(f'  {name:<10} {gib:>4} GiB: {verdict}')


def cli():
  define_config_flag()
  flags.DEFINE_integer('devices', 8, 'Number of devices the mesh spans (resolves a -1 mesh axis).')
  flags.DEFINE_string('device', '', 'Only report this device kind, e.g. "TPU v5e" or "H100".')
  run_cli(main)


if __name__ == '__main__':
  cli()
