"""The GPT model: GPT-2 architecture in Flax Linen, pure arrays in, logits out.

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv',
'mlp', 'layers'), and activations are constrained with logical names too
('act_batch', ...). Which mesh axis each name lands on is decided by the rules
in `jaxgpt.sharding`, never here, so this module imports no training code.

Shape suffixes in names: B batch, T sequence, D embed, H heads, K head dim,
M mlp hidden, V vocab, N = B*T flattened tokens.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  max_len: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  dtype: str = 'float32'  # compute dtype; parameters are always float32
  scan_layers: bool = True
  remat: str = 'none'  # 'none' | 'full' | 'dots'

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size'}
    return cls(vocab_size=vocab_size, **{k: model_cfg[k] for k in fields})


def _init(stddev: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _ones(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.ones, names)


def _zeros(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros, names)


class LayerNorm(nn.Module):
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', _ones(('embed',)), (d,))
    bias = self.param('bias', _zeros(('embed',)), (d,))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def attention_mask(segment_ids_BxT):
  """Causal mask that also keeps packed documents from seeing each other.

  Segment id 0 marks padding: padded queries see nothing useful, but they
  still attend to themselves so softmax stays finite.
  """
  T = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_doc_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxT[None] & same_doc_BxTxT)[:, None]  # B x 1 x T x T


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxT):
    """Returns (x, None): the (carry, output) pair that nn.scan expects."""
    cfg, deterministic = self.cfg, self.deterministic
    B, T, D = x_BxTxD.shape
    H, K, M = cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    dtype = jnp.dtype(cfg.dtype)
    # GPT-2 scales the init of the projections that write into the residual
    # stream by 1/sqrt(2 * layers) so the stream's variance does not grow with depth.
    resid_std = 0.02 / (2 * cfg.num_layers) ** 0.5

    def weight(name, shape, names, std=0.02):
      return self.param(name, _init(std, names), shape).astype(dtype)

    def bias(name, shape, names):
      return self.param(name, _zeros(names), shape).astype(dtype)

    # Dense layers run on 2-D [N, D] activations: XLA:CPU's backward pass is
    # about 2x faster that way than on [B, T, D] (docs/performance.md).
    h_NxD = LayerNorm(name='ln_attn')(x_BxTxD).reshape(B * T, D)
    qkv = []
    for name in ('query', 'key', 'value'):
      w_DxHxK = weight(name, (D, H, K), ('embed', 'heads', 'kv'))
      b_HxK = bias(f'{name}_bias', (H, K), ('heads', 'kv'))
      y_NxHxK = jnp.einsum('nd,dhk->nhk', h_NxD, w_DxHxK) + b_HxK
      y_BxTxHxK = nn.with_logical_constraint(
          y_NxHxK.reshape(B, T, H, K), ('act_batch', 'act_length', 'act_heads', 'act_kv'))
      qkv.append(y_BxTxHxK)
    attn_BxTxHxK = jax.nn.dot_product_attention(*qkv, mask=mask_Bx1xTxT)
    w_HxKxD = weight('out', (H, K, D), ('heads', 'kv', 'embed'), resid_std)
    attn_NxD = jnp.einsum('nhk,hkd->nd', attn_BxTxHxK.reshape(B * T, H, K), w_HxKxD)
    attn_NxD += bias('out_bias', (D,), ('embed',))
    attn_NxD = nn.Dropout(cfg.dropout_rate)(attn_NxD, deterministic=deterministic)
    x_BxTxD = x_BxTxD + attn_NxD.reshape(B, T, D)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed'))

    h_NxD = LayerNorm(name='ln_mlp')(x_BxTxD).reshape(B * T, D)
    up_NxM = h_NxD @ weight('mlp_up', (D, M), ('embed', 'mlp')) + bias('mlp_up_bias', (M,), ('mlp',))
    up_NxM = nn.with_logical_constraint(nn.gelu(up_NxM), ('act_tokens', 'act_mlp'))
    down_NxD = up_NxM @ weight('mlp_down', (M, D), ('mlp', 'embed'), resid_std)
    down_NxD += bias('mlp_down_bias', (D,), ('embed',))
    down_NxD = nn.Dropout(cfg.dropout_rate)(down_NxD, deterministic=deterministic)
    x_BxTxD = x_BxTxD + down_NxD.reshape(B, T, D)
    return nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed')), None


_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class GPT(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None,
               deterministic: bool = True):
    """Returns float32 logits [B, T, V].

    segment_ids and positions come from packing several documents into one
    row: attention stays inside a document and positions restart at each one.
    Without them the row is one document starting at position 0.
    """
    cfg = self.cfg
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    dtype = jnp.dtype(cfg.dtype)

    wte_VxD = self.param('token_embedding', _init(0.02, ('vocab', 'embed')),
                         (cfg.vocab_size, cfg.embed_dim))
    wpe_TxD = self.param('position_embedding', _init(0.01, ('length', 'embed')),
                         (cfg.max_len, cfg.embed_dim))
    x_BxTxD = (wte_VxD[tokens_BxT] + wpe_TxD[positions_BxT]).astype(dtype)
    x_BxTxD = nn.Dropout(cfg.dropout_rate)(x_BxTxD, deterministic=deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed'))
    mask_Bx1xTxT = attention_mask(segment_ids_BxT)

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      # One compiled block, applied num_layers times: compile time does not grow with depth.
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=nn.broadcast, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxD, _ = stack(cfg, deterministic, name='blocks')(x_BxTxD, mask_Bx1xTxT)
    else:
      for i in range(cfg.num_layers):
        x_BxTxD, _ = block(cfg, deterministic, name=f'block_{i}')(x_BxTxD, mask_Bx1xTxT)

    x_BxTxD = LayerNorm(name='ln_final')(x_BxTxD)
    # Tied output embedding, as in GPT-2. Logits in float32 so the softmax is stable in bf16 runs.
    logits_NxV = x_BxTxD.reshape(B * T, -1).astype(jnp.float32) @ wte_VxD.T
    logits_BxTxV = logits_NxV.reshape(B, T, cfg.vocab_size)
    return nn.with_logical_constraint(logits_BxTxV, ('act_batch', 'act_length', 'act_vocab'))


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM-style.

  Counts every matmul: 6 per weight in the blocks and the output projection,
  plus attention scores and their weighted sum (12 * layers * T * D).
  """
  D, M, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers
  matmul_params = L * (4 * D * D + 2 * D * M) + cfg.vocab_size * D
  return 6 * matmul_params + 12 * L * seq_len * D
