"""LoRA: low-rank adapters, as a transform of the parameter tree (the model is untouched).

Each targeted kernel W, read as a matrix [fan_in, fan_out], gets a pair of
adapters A [fan_in, r] and B [r, fan_out]; the model runs with

  W' = W + (alpha / r) * A @ B          (reshaped to W's own shape)

B starts at zero, so training starts exactly at the base model. Training
differentiates only the adapters, so gradients and optimizer state are
adapter-sized; the frozen base comes from `init_from` every time, and a
checkpoint holds the adapters alone. `merge` gives plain params for
evaluation, sampling and export.

Adapter trees mirror the params tree: the kernel at params['blocks']['query']
has its adapters at adapters['blocks']['query'] = {'lora_a', 'lora_b'}, with
the same leading 'layers' axis when layers are scanned.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxgpt.config import JaxgptError

# Targetable kernels: (dimensions of one layer's kernel, how many of them are fan_in, the logical axis
# names of fan_in and fan_out). Attention kernels are 3-D: [embed, heads, head_dim], [heads, head_dim, embed].
TARGETS = {
    'query': (3, 1, 'embed', 'heads'),
    'key': (3, 1, 'embed', 'kv_heads'),
    'value': (3, 1, 'embed', 'kv_heads'),
    'out': (3, 2, 'heads', 'embed'),
    'mlp_up': (2, 1, 'embed', 'mlp'),
    'mlp_gate': (2, 1, 'embed', 'mlp'),
    'mlp_down': (2, 1, 'mlp', 'embed'),
}


def settings(config):
  """The run's LoRA settings, or None when every parameter is trained (also for runs saved before LoRA)."""
  lora_cfg = config.get('lora')
  return lora_cfg if lora_cfg is not None and lora_cfg.rank > 0 else None


def check_config(config) -> None:
  """Refuses LoRA settings that cannot work, all of them in one message."""
  lora_cfg = config.lora
  problems = []
  if lora_cfg.rank < 0:
    problems.append(f'lora.rank={lora_cfg.rank} must be positive (or 0 to train every parameter)')
  if lora_cfg.rank > 0:
    if not config.init_from:
      problems.append('lora.rank > 0 adapts a base model: set init_from (a Hugging Face or jaxgpt run directory)')
    unknown = [t for t in lora_cfg.targets if t not in TARGETS]
    if unknown or not lora_cfg.targets:
      problems.append(f'lora.targets={tuple(lora_cfg.targets)} must name some of {", ".join(TARGETS)}')
    if lora_cfg.alpha <= 0:
      problems.append(f'lora.alpha={lora_cfg.alpha} must be positive')
    if not 0 <= lora_cfg.dropout < 1:
      problems.append(f'lora.dropout={lora_cfg.dropout} must be in [0, 1)')
  if problems:
    raise JaxgptError('invalid config: ' + '; '.join(problems) + '.')


def _kernel_paths(flat_params: dict, targets) -> list[tuple]:
  paths = [path for path in flat_params if path[-1] in targets]
  missing = set(targets) - {path[-1] for path in paths}
  if missing:
    raise JaxgptError(f'lora.targets names {sorted(missing)}, which this model does not have '
                      "(GPT-2's MLP has no 'mlp_gate'; only model.mlp='swiglu' does). Remove them from lora.targets.")
  return paths


def init_adapters(rng, params, lora_cfg) -> dict:
  """Adapters for every targeted kernel of `params` (arrays or shapes), boxed with logical axis names.

  A ~ normal(0, 1 / fan_in) keeps A's output at the input's scale; B = 0 makes the initial update zero.
  """
  flat = traverse_util.flatten_dict(params)
  adapters = {}
  for i, path in enumerate(_kernel_paths(flat, lora_cfg.targets)):
    shape = flat[path].shape
    ndim, fan_in_axes, in_name, out_name = TARGETS[path[-1]]
    stack = len(shape) - ndim  # the leading 'layers' axis of scanned layers
    fan_in = math.prod(shape[stack:stack + fan_in_axes])
    fan_out = math.prod(shape[stack + fan_in_axes:])
    layers = shape[:stack]
    a = jax.random.normal(jax.random.fold_in(rng, i), (*layers, fan_in, lora_cfg.rank)) / math.sqrt(fan_in)
    adapters[path + ('lora_a',)] = nn.LogicallyPartitioned(a, ('layers',) * stack + (in_name, None))
    adapters[path + ('lora_b',)] = nn.LogicallyPartitioned(
        jnp.zeros((*layers, lora_cfg.rank, fan_out)), ('layers',) * stack + (None, out_name))
  return traverse_util.unflatten_dict(adapters)


def merge(params, adapters, lora_cfg, dropout_rng=None) -> dict:
  """`params` with W + (alpha / rank) * A @ B for each adapted kernel; the rest is returned as is.

  With `dropout_rng` (training), each entry of A is dropped with probability lora.dropout and the rest
  rescaled: dropout on the adapter's weights, one mask per step shared by all its tokens, since merged
  weights never see the adapter's input on its own.
  """
  scale = lora_cfg.alpha / lora_cfg.rank
  flat = traverse_util.flatten_dict(params)
  flat_adapters = traverse_util.flatten_dict(adapters)
  kernels = sorted({path[:-1] for path in flat_adapters})
  for i, path in enumerate(kernels):
    a, b = flat_adapters[path + ('lora_a',)], flat_adapters[path + ('lora_b',)]
    if dropout_rng is not None and lora_cfg.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), 1 - lora_cfg.dropout, a.shape)
      a = jnp.where(keep, a / (1 - lora_cfg.dropout), 0.0)
    w = flat[path]
    flat[path] = w + (scale * (a @ b)).reshape(w.shape).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)
