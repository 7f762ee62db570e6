"""LoRA: merged kernels equal base + adapter path, only adapters train, bad settings are refused.

The LoRA config through the commands (train, refuse another rank, sample, export merged) runs in
tests/test_end_to_end.py, on docs/finetuning.md's LoRA run.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import hf, lora, sharding, state
from jaxgpt.model import build_model
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train import make_train_step

# Each target as the model applies it to a layer's input: (input shape for n tokens, einsum).
APPLY = {'query': ('n d', 'nd,dhk->nhk'), 'key': ('n d', 'nd,dhk->nhk'), 'value': ('n d', 'nd,dhk->nhk'),
         'out': ('n h k', 'nhk,hkd->nd'), 'mlp_up': ('n d', 'nd,dm->nm'), 'mlp_gate': ('n d', 'nd,dm->nm'),
         'mlp_down': ('n m', 'nm,md->nd')}


def _config(**lora_settings):
  config = base_config()
  config.model.update(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=16,
                      mlp='swiglu', use_bias=False, position='rope', norm='rmsnorm')
  config.lora.update(rank=4, alpha=8.0, targets=tuple(lora.TARGETS), **lora_settings)
  return config


def _base(config):
  model = build_model(config, 50)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']))
  return model, init(jax.random.key(0))


def _random_adapters(params, lora_cfg):
  """Adapters as training leaves them: B no longer zero."""
  adapters = nn.unbox(lora.init_adapters(jax.random.key(1), params, lora_cfg))
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), adapters)


def test_merged_kernels_compute_base_plus_adapter_path():
  config = _config()
  model, params = _base(config)
  tokens = jnp.arange(16).reshape(2, 8) % 50
  # B = 0 at init: the merged model is the base, bit for bit.
  initial = nn.unbox(lora.init_adapters(jax.random.key(1), params, config.lora))
  jax.tree.map(np.testing.assert_array_equal, lora.merge(params, initial, config.lora), params)

  adapters = _random_adapters(params, config.lora)
  merged = jax.tree.map(np.asarray, lora.merge(params, adapters, config.lora))
  params = jax.tree.map(np.asarray, params)
  scale = config.lora.alpha / config.lora.rank
  sizes = {'n': 5, 'd': 32, 'h': 4, 'k': 8, 'm': 64}
  rng = np.random.default_rng(3)
  for layer in range(2):
    for name, (input_axes, einsum) in APPLY.items():
      w, w_merged = params['blocks'][name][layer], merged['blocks'][name][layer]
      a, b = (adapters['blocks'][name][x][layer] for x in ('lora_a', 'lora_b'))
      x = rng.standard_normal([sizes[axis] for axis in input_axes.split()])
      base_out = np.einsum(einsum, x, w)
      adapter_out = (scale * (x.reshape(5, -1) @ a) @ b).reshape(base_out.shape)
      np.testing.assert_allclose(np.einsum(einsum, x, w_merged), base_out + adapter_out, atol=1e-5)
  # Training's dropout on A (given a key) changes the update.
  dropped = lora.merge(params, adapters, _config(dropout=0.5).lora, jax.random.key(5))
  assert not np.allclose(dropped['blocks']['query'], merged['blocks']['query'])
  # Unscanned layers ('block_0', ...) merge the same way.
  per_layer = lambda tree: hf.params_in_layout(tree, scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, lora.merge(per_layer(params), per_layer(adapters), config.lora),
               per_layer(merged))
  apply = jax.jit(lambda p: model.apply({'params': p}, tokens))
  assert not np.allclose(apply(merged), apply(params), atol=1e-3)


def _one_device_mesh():
  return sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def test_only_adapters_get_optimizer_state_and_learn():
  config = _config()
  config.optim.update(lr=1e-2, warmup_steps=0, weight_decay=0.0)
  model, base = _base(config)
  tx, schedule = make_optimizer(config.optim, 60), learning_rate_schedule(config.optim, 60)
  mesh = _one_device_mesh()
  full = state.create_state(model, tx, 8, mesh, jax.random.key(0))
  adapted = state.create_state(model, tx, 8, mesh, jax.random.key(0), lora_cfg=config.lora)
  num_bytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  # Adam's two moments per trained parameter, and nothing for the frozen ones.
  initial_adapters = nn.unbox(lora.init_adapters(jax.random.key(0), base, config.lora))
  assert jax.tree.structure(adapted.params) == jax.tree.structure(initial_adapters)
  assert num_bytes(adapted.opt_state) == 2 * num_bytes(adapted.params) + 8  # + 2 step counts
  assert num_bytes(full.opt_state) == 2 * num_bytes(full.params) + 8
  assert num_bytes(adapted.opt_state) < num_bytes(full.opt_state) / 2

  tokens = jax.random.randint(jax.random.key(4), (4, 9), 0, 50)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': jnp.ones((4, 8), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(8), (4, 8)), 'loss_mask': jnp.ones((4, 8), jnp.int32)}
  step = jax.jit(make_train_step(model, tx, schedule, 1, lora_cfg=config.lora), donate_argnums=(0,))
  losses = []
  for _ in range(60):  # 30 left the drop at 0.495 once the schedule started one update later
    adapted, metrics = step(adapted, batch, base)
    losses.append(float(metrics['loss']))
  print(f'loss {losses[0]:.3f} -> {losses[-1]:.3f}')
  assert losses[-1] < losses[0] - 0.5
  # What was learned is the adapters, as lora.merge (sampling, export) puts them on the frozen base: the
  # next step's loss is that merged model's loss. (The base is an input the step cannot change.)
  assert jax.tree.structure(adapted.params) == jax.tree.structure(initial_adapters)
  logits = model.apply({'params': lora.merge(base, adapted.params, config.lora)}, batch['inputs'])
  merged_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean())
  _, metrics = step(adapted, batch, base)
  assert merged_loss < losses[0] - 0.5
  np.testing.assert_allclose(float(metrics['loss']), merged_loss, rtol=1e-5)


def test_lora_settings_that_cannot_work_are_refused():
  def refusal(**settings):
    config = _config()
    config.init_from = '/models/base'
    config.lora.update(**settings)
    with pytest.raises(JaxgptError) as error:
      lora.check_config(config)
    return str(error.value)
  assert 'lora.rank=-1 must be positive' in refusal(rank=-1)
  assert "must name some of query, key" in refusal(targets=('query', 'attn'))
  assert 'lora.dropout=1.0' in refusal(dropout=1.0)
  config = _config()
  with pytest.raises(JaxgptError, match='set init_from'):
    lora.check_config(config)
  config.model.mlp = 'gelu'
  _, params = _base(config)
  with pytest.raises(JaxgptError, match=r"\['mlp_gate'\], which this model does not have"):
    lora.init_adapters(jax.random.key(0), params, config.lora)
