"""Plan a run before paying for it: parameters, FLOPs, per-device memory for training and serving, and the
time and cost of training.

  python tools/plan.py --config configs/gpt2.py:small --devices 8
  python tools/plan.py --config configs/llama_1b.py --devices 16 --config.mesh.tensor=2 --device 'TPU v5e'
  python tools/plan.py --config configs/llama_1b.py --devices 64 --slices 4 --config.optim.grad_accum_steps=4 \
      --infer_batch 32 --infer_context 1024

Shards every parameter exactly as training would (the model's logical axes
through the config's rules onto the mesh), then estimates activation memory
for each remat policy with the standard per-layer formulas (Korthikanti et
al. 2022). For serving (jaxgpt.sample, evaluate, serve): the parameters in the
compute dtype on the inference mesh (every weight split over --infer_devices,
heads also over --infer_tensor) plus the key/value cache of --infer_batch
sequences of --infer_context tokens, sharded as the model shards it (rows over
data x fsdp, kv heads over tensor). Then training's time and cost: --tokens
(default Chinchilla's 20 per parameter) at the model's FLOPs per token
(jaxgpt.model.flops_per_token, as MFU counts them), on --devices of each kind at
--mfu of its data-sheet peak (jaxgpt.metrics.PEAK_FLOPS), at PRICE_PER_HOUR or
--price_per_hour. Needs no accelerator: shapes only.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from jaxgpt import inference, sharding  # noqa: E402
from jaxgpt.config import JaxgptError, define_config_flag, require_config, run_cli  # noqa: E402
from jaxgpt.metrics import data_sheet_peak, format_duration, tokens_per_second_at  # noqa: E402
from jaxgpt.model import GPT, ModelConfig, flops_per_token  # noqa: E402

# Memory per device, GiB, as the data sheets round it.
DEVICE_MEMORY = {
    'TPU v4': 32, 'TPU v5e': 16, 'TPU v5p': 95, 'TPU v6e': 32, 'TPU7x': 192,
    'A100 40GB': 40, 'A100 80GB': 80, 'H100': 80, 'H100 NVL': 94, 'H200': 141, 'B200': 180,
}
GiB = 2**30
# The device kinds above as jax names them (metrics.PEAK_FLOPS's keys), where the names differ.
DEVICE_KIND = {'TPU v6e': 'TPU v6 lite', 'A100 40GB': 'NVIDIA A100', 'A100 80GB': 'NVIDIA A100', 'H100': 'NVIDIA H100',
               'H100 NVL': 'NVIDIA H100 NVL', 'H200': 'NVIDIA H200', 'B200': 'NVIDIA B200'}
# USD per device-hour, on demand: Google Cloud's list prices in us-central1 (TPU v4: us-central2) as of June
# 2025, from cloud.google.com/tpu/pricing (per chip-hour) and cloud.google.com/compute/vm-instance-pricing (an
# A2/A3 machine's price, its vCPUs and memory included, over its GPUs: a2-highgpu-1g, a2-ultragpu-1g,
# a3-highgpu-8g). Copied by hand, not fetched: prices change and discounts apply, so check them and pass
# --price_per_hour. Kinds without a listed price show none.
PRICE_PER_HOUR = {'TPU v4': 3.22, 'TPU v5e': 1.20, 'TPU v5p': 4.20, 'TPU v6e': 2.70, 'A100 40GB': 3.67,
                  'A100 80GB': 5.07, 'H100': 11.06}
PRICES_AS_OF = 'Google Cloud on-demand list price, June 2025'
CHINCHILLA_TOKENS_PER_PARAM = 20  # compute-optimal training tokens per parameter (Hoffmann et al. 2022)
# XLA owns a TPU's whole HBM; a tenth is left for what these estimates leave out (the program,
# XLA's scratch buffers, fragmentation).
TPU_USABLE = 0.9
GPU_MEMORY_FRACTION = 0.75  # JAX's GPU allocator takes this share of the memory unless told otherwise


def usable_fraction(device: str) -> tuple[float, str]:
  """The share of `device`'s memory a run can fill, and why."""
  if device.startswith('TPU'):
    return TPU_USABLE, 'headroom for XLA'
  # JAX reads the newer name first; the older one still works.
  for name in ('XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    if os.environ.get(name):
      return float(os.environ[name]), f'{name}'
  return GPU_MEMORY_FRACTION, "JAX's default GPU share"


def _per_device_elements(shape, mesh_axes, mesh_sizes: dict) -> int:
  """Elements of an array of `shape` one device holds when dimension i is split over mesh_axes[i]."""
  elements = 1
  for size, axes in zip(shape, mesh_axes):
    split = math.prod(mesh_sizes[a] for a in (axes if isinstance(axes, tuple) else (axes,)) if a)
    elements *= -(-size // split)  # an uneven split pads the last shard
  return elements


def _sharded_bytes(abstract_params, specs, mesh_sizes: dict, rules, bytes_per_element: int) -> int:
  """Bytes of the parameters one device holds under the logical rules."""
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return sum(_per_device_elements(leaf.shape, nn.logical_to_mesh_axes(spec, rules), mesh_sizes) * bytes_per_element
             for leaf, spec in zip(jax.tree.leaves(abstract_params), leaves))


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, mesh_sizes: dict, rules) -> int:
  """One device's share of the key and value caches (model.init_cache) for `batch` rows of `context` tokens."""
  shape = (batch, context, cfg.kv_heads, cfg.head_dim)  # per layer, as the model constrains it
  mesh_axes = nn.logical_to_mesh_axes(('act_batch', 'act_length', 'act_heads', 'act_kv'), rules)
  per_layer = _per_device_elements(shape, mesh_axes, mesh_sizes) * jnp.dtype(cfg.dtype).itemsize
  return 2 * cfg.num_layers * per_layer


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


def plan(config, num_devices: int, num_slices: int = 1, infer_devices: int = 0, infer_tensor: int = 1,
         infer_batch: int = 8, infer_context: int = 0) -> dict:
  """Training on `num_devices` in `num_slices` slices by config.mesh; serving on `infer_devices` (default: as
  many) by the inference commands' default mesh (every weight over every device) with --mesh.tensor=`infer_tensor`."""
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices, num_slices)))
  rules = sharding.logical_rules(config.mesh)
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size, backend='accelerator')  # plans are for GPU/TPU
  boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  params = nn.unbox(boxed)
  specs = nn.get_partition_spec(boxed)
  param_bytes = _sharded_bytes(params, specs, sizes, rules, 4)  # float32
  sharding.check_divisibility(config, sizes)
  local_batch = config.batch_size // sharding.data_parallel_size(sizes) // config.optim.grad_accum_steps
  infer_context = infer_context or cfg.max_len
  if infer_batch < 1 or not 0 < infer_context <= cfg.max_len:
    raise JaxgptError(f'--infer_batch={infer_batch} must be positive and --infer_context={infer_context} between 1 '
                      f'and model.max_len={cfg.max_len}.')
  infer_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape({**inference.DEFAULT_MESH, 'tensor': infer_tensor},
                                                                 infer_devices or num_devices)))
  if cfg.num_heads % infer_tensor or cfg.kv_heads % infer_tensor:
    raise JaxgptError(f'--infer_tensor={infer_tensor} must divide model.num_heads={cfg.num_heads} and the kv heads '
                      f'({cfg.kv_heads}).')
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
      'dtype': cfg.dtype,
      'infer_mesh': infer_sizes,
      'infer_batch': infer_batch,
      'infer_context': infer_context,
      'infer_param_bytes': _sharded_bytes(params, specs, infer_sizes, rules, jnp.dtype(cfg.dtype).itemsize),
      'kv_cache_bytes': kv_cache_bytes(cfg, infer_batch, infer_context, infer_sizes, rules),
  }


def training_time(params: int, flops_per_token: float, num_devices: int, device: str, mfu: float,
                  tokens: float = 0, price_per_hour: float = 0) -> dict:
  """Tokens, FLOPs, wall time and cost of training on `num_devices` of kind `device` at `mfu`.

  `tokens` 0: Chinchilla's 20 per parameter. `price_per_hour` (per device) 0: PRICE_PER_HOUR's, or no cost.
  """
  if not 0 < mfu <= 1:
    raise JaxgptError(f'--mfu={mfu} must be a fraction of the peak, above 0 and at most 1 (e.g. 0.4).')
  if tokens < 0 or price_per_hour < 0:
    raise JaxgptError(f'--tokens={tokens:g} and --price_per_hour={price_per_hour:g} must be 0 (the default) or '
                      'positive.')
  tokens = tokens or CHINCHILLA_TOKENS_PER_PARAM * params
  peak = data_sheet_peak(DEVICE_KIND.get(device, device))
  seconds = tokens / tokens_per_second_at(mfu, flops_per_token, peak, num_devices)
  price = price_per_hour or PRICE_PER_HOUR.get(device)
  device_hours = seconds * num_devices / 3600
  return {'tokens': tokens, 'flops': tokens * flops_per_token, 'peak': peak, 'seconds': seconds,
          'device_hours': device_hours, 'price_per_hour': price, 'cost': price and price * device_hours}


def _devices(wanted: str) -> list[str]:
  names = [n for n in DEVICE_MEMORY if n == wanted] or [n for n in DEVICE_MEMORY if n.startswith(wanted)]
  if not names:
    raise JaxgptError(f'--device={wanted!r} is not one of {", ".join(DEVICE_MEMORY)}.')
  return names


def _verdicts(total: int, devices: list[str], label: str) -> None:
  for name in devices:
    fraction, why = usable_fraction(name)
    verdict = 'fits' if total < fraction * DEVICE_MEMORY[name] * GiB else 'DOES NOT FIT'
    print(f'  {name:<10} {DEVICE_MEMORY[name]:>4} GiB{label}: {verdict} '
          f'(usable {fraction * DEVICE_MEMORY[name]:.0f} GiB: {why})')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = require_config(FLAGS.config)
  p = plan(config, FLAGS.devices, FLAGS.slices, FLAGS.infer_devices, FLAGS.infer_tensor, FLAGS.infer_batch,
           FLAGS.infer_context)
  devices = _devices(FLAGS.device) if FLAGS.device else list(DEVICE_MEMORY)
  fixed = p['param_bytes'] + p['optimizer_bytes'] + p['gradient_bytes']
  slices = f' ({FLAGS.slices} slices)' if FLAGS.slices > 1 else ''
  print(f'mesh {p["mesh"]} on {FLAGS.devices} devices{slices}')
  print(f'parameters      {p["params"] / 1e6:,.1f}M   training FLOPs/token {p["flops_per_token"] / 1e9:.2f} G')
  print('training, per device (GiB):')
  print(f'  params (fp32)        {p["param_bytes"] / GiB:8.2f}')
  print(f'  optimizer (Adam)     {p["optimizer_bytes"] / GiB:8.2f}')
  print(f'  gradients            {p["gradient_bytes"] / GiB:8.2f}')
  for remat, act in p['activation_bytes'].items():
    mark = '  <- config' if remat == p['remat'] else ''
    print(f'  activations remat={remat:<5} {act / GiB:8.2f}   total {(fixed + act) / GiB:8.2f}{mark}')
  _verdicts(fixed + p['activation_bytes'][p['remat']], devices, '')
  serving = p['infer_param_bytes'] + p['kv_cache_bytes']
  print(f'serving {p["infer_batch"]} sequences of {p["infer_context"]} tokens on mesh {p["infer_mesh"]}, '
        'per device (GiB):')
  print(f'  {"params (" + p["dtype"] + ")":<20} {p["infer_param_bytes"] / GiB:8.2f}')
  print(f'  KV cache             {p["kv_cache_bytes"] / GiB:8.2f}')
  print(f'  total                {serving / GiB:8.2f}   (and one step\'s activations)')
  _verdicts(serving, devices, ' to serve')
  _print_training_time(p, devices, FLAGS)


def _print_training_time(p: dict, devices: list[str], FLAGS) -> None:
  first = training_time(p['params'], p['flops_per_token'], FLAGS.devices, devices[0], FLAGS.mfu, FLAGS.tokens)
  source = 'the --tokens asked' if FLAGS.tokens else f'Chinchilla\'s {CHINCHILLA_TOKENS_PER_PARAM} per parameter'
  print(f'training on {_amount(first["tokens"])} tokens ({source}): {first["flops"]:.3g} FLOPs; on --devices '
        f'{FLAGS.devices} at {100 * FLAGS.mfu:g}% MFU (--mfu):')
  for name in devices:
    t = training_time(p['params'], p['flops_per_token'], FLAGS.devices, name, FLAGS.mfu, FLAGS.tokens,
                      FLAGS.price_per_hour)
    if t['cost'] is None:
      cost = 'no price listed (--price_per_hour)'
    else:
      where = '--price_per_hour' if FLAGS.price_per_hour else PRICES_AS_OF
      cost = f'${t["cost"]:,.0f} at ${t["price_per_hour"]:.2f}/device-hour ({where})'
    print(f'  {name:<10} {t["peak"] / 1e12:>5,.0f} TFLOP/s: {_days(t["seconds"]):>9} '
          f'({_amount(t["device_hours"])} device-hours), {cost}')


def _days(seconds: float) -> str:
  return f'{seconds / 86400:.1f} days' if seconds >= 2 * 86400 else format_duration(seconds)


def _amount(x: float) -> str:
  """3 significant digits with a thousands prefix: 2.49B, 812k, 3.1."""
  for factor, prefix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
    if x >= factor:
      return f'{x / factor:.3g}{prefix}'
  return f'{x:.3g}'


def cli():
  define_config_flag()
  flags.DEFINE_integer('devices', 8, 'Number of devices the mesh spans (resolves a -1 mesh axis).')
  flags.DEFINE_integer('slices', 1, 'TPU slices (or GPU hosts) the devices form; mesh.dcn_* span them.')
  flags.DEFINE_string('device', '', 'Only report this device kind, e.g. "TPU v5e" or "H100".')
  flags.DEFINE_integer('infer_devices', 0, 'Devices that serve (sample, evaluate): 0 = --devices.')
  flags.DEFINE_integer('infer_tensor', 1, 'Their --mesh.tensor; the other devices shard the weights (--mesh.fsdp=-1).')
  flags.DEFINE_integer('infer_batch', 8, 'Sequences decoded together when serving (jaxgpt.serve --max_batch).')
  flags.DEFINE_integer('infer_context', 0, 'Tokens per sequence (prompt + new) when serving; 0 = model.max_len.')
  flags.DEFINE_float('tokens', 0, 'Tokens to train on; 0 = 20 per parameter (Chinchilla).')
  flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilization assumed (or measured: jaxgpt.train and tools/bench.py '
                     'print it), a fraction of the peak.')
  flags.DEFINE_float('price_per_hour', 0, 'USD per device-hour; 0 = the table in tools/plan.py (PRICE_PER_HOUR).')
  run_cli(main)


if __name__ == '__main__':
  cli()
