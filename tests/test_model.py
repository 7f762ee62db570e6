import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import LLAMA_OPTIONS, architecture_variants

from jaxgpt.config import JaxgptError
from jaxgpt.model import GPT, ModelConfig, attention_plan, chunked_cross_entropy, flops_per_token, num_params

CFG = ModelConfig(vocab_size=97, max_len=32, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64)
VARIANTS = architecture_variants(CFG)
variants = pytest.mark.parametrize('cfg', VARIANTS.values(), ids=VARIANTS.keys())


def _init(cfg=CFG, T=16):
  model = GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))['params'])
  return model, params


@variants
def test_changing_a_later_token_never_changes_earlier_logits(cfg):
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % CFG.vocab_size)
  a, b = model.apply({'params': params}, tokens), model.apply({'params': params}, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3  # and later logits do change


@variants
def test_packed_documents_do_not_see_each_other(cfg):
  """A document's logits are the same alone or packed after another document."""
  model, params = _init(cfg)
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


@pytest.mark.parametrize('scan_layers,remat', [(False, 'none'), (True, 'full'), (True, 'dots'), (True, 'offload'),
                                               (False, 'full')])
@pytest.mark.parametrize('cfg', [CFG, VARIANTS['llama']], ids=['gpt2', 'llama'])
def test_scan_and_remat_give_the_same_loss_and_gradients(cfg, scan_layers, remat):
  model, params = _init(cfg)
  variant = GPT(dataclasses.replace(cfg, scan_layers=scan_layers, remat=remat))
  variant_params = params
  if not scan_layers:  # unstack the scanned layer axis into block_0, block_1
    variant_params = {k: v for k, v in params.items() if k != 'blocks'}
    for i in range(cfg.num_layers):
      variant_params[f'block_{i}'] = jax.tree.map(lambda x: x[i], params['blocks'])
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.vocab_size)

  def loss(m, p):
    logits = m.apply({'params': p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  np.testing.assert_allclose(loss(variant, variant_params), loss(model, params), rtol=1e-6)
  grads = jax.grad(lambda p: loss(variant, p))(variant_params)
  reference = jax.grad(lambda p: loss(model, p))(params)
  if not scan_layers:
    per_layer = [grads.pop(f'block_{i}') for i in range(cfg.num_layers)]
    grads['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@variants
def test_every_architecture_option_trains(cfg):
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(5), (4, 17), 0, cfg.vocab_size)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({'params': p}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  losses = []
  for _ in range(30):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0], losses


@variants
def test_every_parameter_has_logical_axis_names(cfg):
  model = GPT(cfg)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for _, x in leaves)
  # Each name stands for one size: a name on the wrong axis (say 'embed' and 'mlp' swapped) would shard the
  # wrong dimension. Only the scanned blocks carry 'layers', and always first.
  sizes = {'layers': cfg.num_layers, 'embed': cfg.embed_dim, 'vocab': cfg.vocab_size, 'length': cfg.max_len,
           'heads': cfg.num_heads, 'kv_heads': cfg.kv_heads, 'kv': cfg.head_dim, 'mlp': cfg.mlp_dim}
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, name
    assert dict(zip(leaf.names, leaf.value.shape)) == {n: sizes[n] for n in leaf.names}, (name, leaf.names)
    assert (leaf.names[0] == 'layers') == name.startswith("['blocks']") and leaf.names.count('layers') <= 1, name


def test_parameter_count_and_flops_match_gpt2_small():
  cfg = ModelConfig(vocab_size=50257, max_len=1024)  # GPT-2 small: 124M parameters
  shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  assert num_params(shapes) == 124_439_808
  # 6 per matmul weight (12 blocks of 4 D^2 + 2 D x 4D, and the 50257 x D head), plus causal attention
  # at half of 12 * layers * T * D, as MaxText counts it.
  matmul_weights = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50257 * 768
  assert flops_per_token(cfg, 1024) == 6 * matmul_weights + 6 * 12 * 1024 * 768  # 0.798 GFLOPs


def test_llama_style_parameter_count():
  cfg = ModelConfig(vocab_size=1000, max_len=64, num_layers=2, num_heads=8, embed_dim=64, mlp_dim=96, **LLAMA_OPTIONS)
  shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  D, M, G, K = 64, 96, 2, 8
  per_layer = D * D * 2 + 2 * D * G * K + 3 * D * M + 2 * D  # q, out, k, v, gate/up/down, two norms
  assert num_params(shapes) == 2 * per_layer + 2 * 1000 * D + D  # untied in/out embeddings, final norm


def test_chunked_cross_entropy_matches_the_full_loss_and_gradients():
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(6), (2, 17), 0, cfg.vocab_size)

  def full(p):
    logits = model.apply({'params': p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def chunked(p):
    hidden, head = model.apply({'params': p}, tokens[:, :-1], return_hidden=True)
    return chunked_cross_entropy(hidden, head, tokens[:, 1:].reshape(-1), chunk=8).mean()

  np.testing.assert_allclose(chunked(params), full(params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.grad(chunked)(params)), jax.tree.leaves(jax.grad(full)(params))):
    np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)


def test_splash_attention_matches_xla_on_packed_rows():
  """The Pallas kernel (interpreted on CPU) against XLA: causal, segment-masked, GQA; values and gradients."""
  T = 128  # splash tiles the sequence by 128
  cfg = dataclasses.replace(VARIANTS['llama'], max_len=T)
  model, params = _init(cfg, T)
  splash = GPT(dataclasses.replace(cfg, attention='splash'))
  tokens = jax.random.randint(jax.random.key(5), (2, T + 1), 0, cfg.vocab_size)
  lengths = [(40, 88), (T, 0)]  # row 0 packs two documents, row 1 holds one
  segments = jnp.array([[1] * a + [2] * b for a, b in lengths])
  positions = jnp.array([list(range(a)) + list(range(b)) for a, b in lengths])

  def loss(m, p):
    logits = m.apply({'params': p}, tokens[:, :-1], segments, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  np.testing.assert_allclose(loss(splash, params), loss(model, params), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(lambda p: loss(splash, p))(params)),
                  jax.tree.leaves(jax.grad(lambda p: loss(model, p))(params))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_dtype_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
  from jaxgpt.config import base_config
  model_cfg = base_config().model
  assert model_cfg.dtype == 'auto'
  assert ModelConfig.from_config(model_cfg, 97, backend='cpu').dtype == 'float32'
  assert ModelConfig.from_config(model_cfg, 97, backend='tpu').dtype == 'bfloat16'
  assert ModelConfig.from_config(model_cfg, 97, backend='gpu').dtype == 'bfloat16'


@pytest.mark.parametrize('cfg', [CFG, VARIANTS['llama']], ids=['gpt2', 'llama'])
def test_bfloat16_compute_keeps_float32_parameters_and_matches_float32(cfg):
  model, params = _init(cfg)
  half = GPT(dataclasses.replace(cfg, dtype='bfloat16'))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, cfg.vocab_size)
  full_logits, half_logits = model.apply({'params': params}, tokens), half.apply({'params': params}, tokens)
  assert half_logits.dtype == jnp.float32  # the softmax runs in float32
  # bf16 rounding moves these logits (std about 0.12) by about 0.002; 0.05 would let a real error through.
  np.testing.assert_allclose(half_logits, full_logits, atol=0.01)
  assert np.abs(np.asarray(half_logits - full_logits)).max() > 0  # it did compute in bf16


@pytest.mark.parametrize('attention,backend,changes,packed,decoding,expected', [
    ('auto', 'gpu', {}, False, None, ('cudnn', 'causal')),  # cuDNN's causal kernel: no dense mask, no bias
    ('auto', 'gpu', {}, True, None, ('xla', 'segments')),  # JAX's cuDNN call takes no segment ids
    ('auto', 'gpu', {'dtype': 'float32'}, False, None, ('xla', 'causal')),  # cuDNN flash attention: fp16/bf16
    ('auto', 'gpu', {'embed_dim': 320, 'num_heads': 2}, False, None, ('xla', 'causal')),  # head dim 160 > 128
    ('auto', 'gpu', {}, False, 'prompt', ('cudnn', 'causal')),  # a prefill attends as training does
    ('auto', 'gpu', {}, False, 'step', ('xla', 'cache')),  # a decode step attends over the cache slots
    ('auto', 'tpu', {}, False, None, ('xla', 'causal')),
    ('auto', 'cpu', {'dtype': 'float32'}, True, None, ('xla', 'segments')),
    ('cudnn', 'gpu', {}, False, None, ('cudnn', 'causal')),
    ('cudnn', 'gpu', {}, True, None, ('cudnn', 'segments')),  # insisted on: the slow bias path
    ('xla', 'gpu', {}, False, None, ('xla', 'causal')),
    ('splash', 'tpu', {}, True, None, ('splash', 'segments')),
    ('splash', 'tpu', {}, False, 'prompt', ('xla', 'causal')),  # a prompt of any length; splash tiles by 128
    ('splash', 'tpu', {}, False, 'step', ('xla', 'cache')),
])
def test_attention_plan_takes_cudnn_with_the_causal_flag_where_it_applies(attention, backend, changes, packed,
                                                                          decoding, expected):
  cfg = dataclasses.replace(CFG, attention=attention, **{'dtype': 'bfloat16', **changes})
  plan = attention_plan(cfg, backend, packed=packed, cached=decoding == 'step', prompt=decoding == 'prompt')
  assert tuple(plan) == expected


@pytest.mark.parametrize('attention,backend,dtype,message', [
    ('cudnn', 'cpu', 'bfloat16', "'cudnn' needs an NVIDIA GPU, and JAX runs on cpu"),
    ('cudnn', 'tpu', 'bfloat16', "'cudnn' needs an NVIDIA GPU, and JAX runs on tpu"),
    ('cudnn', 'gpu', 'float32', "computes in bfloat16 or float16, and model.dtype is 'float32'"),
    ('splash', 'gpu', 'bfloat16', "'splash' is a TPU kernel"),
])
def test_attention_that_cannot_run_is_one_clear_error(attention, backend, dtype, message):
  cfg = dataclasses.replace(CFG, attention=attention, dtype=dtype)
  with pytest.raises(JaxgptError, match=message):
    attention_plan(cfg, backend, packed=True, cached=False)
  if backend == 'cpu':  # and the model says so when it is built here, not XLA from deep inside
    with pytest.raises(JaxgptError, match=message):
      _init(cfg)


def test_the_causal_flag_gives_the_logits_of_the_causal_mask():
  """One document per row (no segment ids) runs XLA with is_causal; the same rows as segments run the mask."""
  cfg = VARIANTS['llama']  # grouped-query attention too
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, cfg.vocab_size)
  ones = jnp.ones_like(tokens)
  assert attention_plan(cfg, 'cpu', packed=False, cached=False).mask == 'causal'
  apply = jax.jit(model.apply)
  causal = apply({'params': params}, tokens)
  masked = apply({'params': params}, tokens, ones, jnp.broadcast_to(jnp.arange(16), (2, 16)))
  np.testing.assert_allclose(causal, masked, atol=1e-6, rtol=1e-6)
  # (test_changing_a_later_token_never_changes_earlier_logits checks that the causal path is causal.)
