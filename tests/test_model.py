import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.model import GPT, ModelConfig, flops_per_token, num_params

CFG = ModelConfig(vocab_size=97, max_len=32, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64)


def _init(cfg=CFG, T=16):
  model = GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))['params'])
  return model, params


def test_changing_a_later_token_never_changes_earlier_logits():
  model, params = _init()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % CFG.vocab_size)
  a, b = model.apply({'params': params}, tokens), model.apply({'params': params}, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3  # and later logits do change


def test_packed_documents_do_not_see_each_other():
  """A document's logits are the same alone or packed after another document."""
  model, params = _init()
  doc_a = jax.random.randint(jax.random.key(2), (1, 6), 0, CFG.vocab_size)
  doc_b = jax.random.randint(jax.random.key(3), (1, 10), 0, CFG.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  packed_logits = model.apply({'params': params}, packed, segments, positions)
  alone_b = model.apply({'params': params}, doc_b)
  alone_a = model.apply({'params': params}, doc_a)
  np.testing.assert_allclose(packed_logits[:, 6:], alone_b, atol=1e-5)
  np.testing.assert_allclose(packed_logits[:, :6], alone_a, atol=1e-5)


@pytest.mark.parametrize('scan_layers,remat', [(False, 'none'), (True, 'full'), (True, 'dots')])
def test_scan_and_remat_compute_the_same_function(scan_layers, remat):
  model, params = _init()
  variant = GPT(ModelConfig(**{**CFG.__dict__, 'scan_layers': scan_layers, 'remat': remat}))
  if not scan_layers:  # unstack the scanned layer axis into block_0, block_1
    blocks = params['blocks']
    params = {k: v for k, v in params.items() if k != 'blocks'}
    for i in range(CFG.num_layers):
      params[f'block_{i}'] = jax.tree.map(lambda x: x[i], blocks)
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, CFG.vocab_size)
  reference = GPT(CFG).apply({'params': _init()[1]}, tokens)
  np.testing.assert_allclose(variant.apply({'params': params}, tokens), reference, atol=1e-5)
  grad = jax.grad(lambda p: variant.apply({'params': p}, tokens).mean())(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))


def test_every_parameter_has_logical_axis_names():
  model = GPT(CFG)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    assert leaf.names[0] == 'layers' or leaf.value.ndim <= 2


def test_parameter_count_and_flops_match_gpt2_small():
  cfg = ModelConfig(vocab_size=50257, max_len=1024)  # GPT-2 small: 124M parameters
  shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  assert num_params(shapes) == 124_439_808
  # 6N for the matmul weights plus attention: about 0.85 GFLOPs per token at T=1024.
  assert 0.8e9 < flops_per_token(cfg, 1024) < 0.9e9
