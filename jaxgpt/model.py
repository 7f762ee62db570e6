"""The GPT model in Flax Linen: pure arrays in, logits out.

The default is the GPT-2 architecture (learned positions, LayerNorm, GELU MLP,
biases, tied output embedding). Config switches give the modern options —
RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output —
which together make a Llama-style model, and those of today's other bases:
Llama 3's RoPE scaling, Mistral's sliding window, Qwen2's query/key/value
biases, GPT-J's and GPT-NeoX's parallel blocks and partial, interleaved RoPE.

Every parameter carries logical axis names ('vocab', 'embed', 'heads',
'kv_heads', 'kv', 'mlp', 'layers'), and activations are constrained with
logical names too ('act_batch', ...). Which mesh axis each name lands on is
decided by the rules in `jaxgpt.sharding`, never here, so this module imports
no training code.

Decoding passes a key/value cache (`init_cache`) in and out: each block
writes the new tokens' keys and values at their positions and attends over the
whole cache. Training passes no cache and runs exactly the code it always ran.
Which attention kernel runs where is decided in one place, `attention_plan`.

Shape suffixes in names: B batch, T sequence, D embed, H query heads, G kv
heads, K head dim, M mlp hidden, V vocab, N = B*T flattened tokens, L layers,
S cache slots.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxgpt.config import JaxgptError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  max_len: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  embed_dim: int = 768
  mlp_dim: int = 3072
  position: str = 'learned'  # 'learned' (GPT-2) | 'rope'
  rope_theta: float = 10000.0
  rotary_dim: int = 0  # RoPE rotates each head's first rotary_dim dimensions (GPT-J, GPT-NeoX); 0 = all of them
  rope_interleaved: bool = False  # RoPE pairs dimensions (2i, 2i + 1) (GPT-J), not (i, i + R/2) (Llama, NeoX)
  rope_scaling: str = 'none'  # 'none' | 'llama3' (Llama 3.1+'s long-context frequencies, see `rope_frequencies`)
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192  # the context length the frequencies were pretrained for
  sliding_window: int = 0  # >0: a token attends to itself and the sliding_window - 1 before it (Mistral)
  norm: str = 'layernorm'  # 'layernorm' | 'rmsnorm'
  norm_epsilon: float = 1e-5
  mlp: str = 'gelu'  # 'gelu' (tanh approximation: GPT-2, GPT-J) | 'gelu_exact' (erf: GPT-NeoX) | 'swiglu'
  use_bias: bool = True  # biases on every projection
  qkv_bias: bool = False  # biases on query, key and value even without use_bias (Qwen2)
  mlp_bias: bool = False  # biases in the MLP even without use_bias (GPT-J)
  output_bias: bool = False  # a bias on the output projection (GPT-J)
  parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)), not one after the other (GPT-J, GPT-NeoX)
  shared_norm: bool = False  # parallel_residual: one norm feeds both (GPT-J), not one each (GPT-NeoX)
  # 'auto' (cuDNN's causal flash attention on GPU when it applies, else XLA) | 'xla' | 'cudnn' | 'splash'
  # (Pallas, TPU); see `attention_plan`
  attention: str = 'auto'
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  dtype: str = 'float32'  # compute dtype; parameters are always float32
  scan_layers: bool = True
  remat: str = 'none'  # 'none' | 'full' | 'dots' | 'offload'
  loss_chunk: int = 0  # >0: the training loss computes logits this many tokens at a time

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int, backend: str | None = None) -> 'ModelConfig':
    """From a config's model section. dtype 'auto' becomes bfloat16 on GPU/TPU and float32 on
    CPU (`backend`, default JAX's), where XLA's bf16 matmuls are slower than float32 ones."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size'}
    cfg = cls(vocab_size=vocab_size, **{k: model_cfg[k] for k in fields if k in model_cfg})
    if cfg.dtype == 'auto':
      cpu = (backend or jax.default_backend()) == 'cpu'
      cfg = dataclasses.replace(cfg, dtype='float32' if cpu else 'bfloat16')
    return cfg


def _normal(stddev: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


class Norm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""
  kind: str = 'layernorm'
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)), (d,))
    if self.kind == 'rmsnorm':
      y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon) * scale
    else:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)), (d,))
      centered = x32 - x32.mean(-1, keepdims=True)
      y = centered * jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def attention_mask(segment_ids_BxT, window: int = 0):
  """Causal mask that also keeps packed documents from seeing each other (and, with a sliding window,
  a token from those more than window - 1 before it: within a document, row distance is position distance).

  Segment id 0 marks padding: padded queries see nothing useful, but they
  still attend to themselves so softmax stays finite.
  """
  T = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
  if window:
    causal_TxT &= ~jnp.tril(causal_TxT, -window)
  same_doc_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxT[None] & same_doc_BxTxT)[:, None]  # B x 1 x T x T


# Each layer's cached keys (and values): B x G x S x K, kv heads before slots so that a head's
# keys are contiguous for the attention matmuls (in B x S x G x K XLA:CPU transposes the whole
# cache before each of them). The logical names say how a mesh splits it: rows as the batch,
# kv heads as the heads.
CACHE_AXES = ('act_batch', 'act_heads', 'act_length', 'act_kv')


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """Empty key/value cache of `length` slots: {'key', 'value'}, each a tuple of one B x G x S x K array per layer.

  One array per layer, not one stacked array: a decode step then updates each layer's
  buffer in place and reads it as it is, where slicing a stacked cache copies it.
  """
  shape = (batch, cfg.kv_heads, length, cfg.head_dim)
  return {name: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)) for name in ('key', 'value')}


def cache_attention(query_BxTxHxK, key_BxGxSxK, value_BxGxSxK, positions_BxT, window: int = 0):
  """Attention of new tokens over the cache slots: a token at position p sees slots 0..p (p - window + 1..p
  with a sliding window).

  Slots past p may hold padding written during a batched prefill; they are
  overwritten before any query can see them. Logits and softmax in float32, as
  jax.nn.dot_product_attention computes them.
  """
  B, T, H, K = query_BxTxHxK.shape
  G, S = key_BxGxSxK.shape[1], key_BxGxSxK.shape[2]
  # Query head h uses kv head h // (H // G), as in jax.nn.dot_product_attention.
  query_BxGxRxTxK = query_BxTxHxK.reshape(B, T, G, H // G, K).transpose(0, 2, 3, 1, 4)
  logits_BxGxRxTxS = jnp.einsum('bgrtk,bgsk->bgrts', query_BxGxRxTxK, key_BxGxSxK,
                                preferred_element_type=jnp.float32) * K ** -0.5
  distance_BxTxS = positions_BxT[:, :, None] - jnp.arange(S)
  visible_BxTxS = (distance_BxTxS >= 0) & (distance_BxTxS < window) if window else distance_BxTxS >= 0
  visible_Bx1x1xTxS = visible_BxTxS[:, None, None]
  logits_BxGxRxTxS = jnp.where(visible_Bx1x1xTxS, logits_BxGxRxTxS, jnp.finfo(jnp.float32).min)
  probs_BxGxRxTxS = jax.nn.softmax(logits_BxGxRxTxS, axis=-1).astype(value_BxGxSxK.dtype)
  attn_BxTxGxRxK = jnp.einsum('bgrts,bgsk->btgrk', probs_BxGxRxTxS, value_BxGxSxK)
  return attn_BxTxGxRxK.reshape(B, T, H, K)


class AttentionPlan(NamedTuple):
  implementation: str  # 'xla' or 'cudnn' (jax.nn.dot_product_attention's), or 'splash'
  mask: str  # 'causal' (the kernel's causal flag), 'segments' (a dense mask: packed rows) or 'cache' (slots)


def _cudnn_applies(cfg: ModelConfig) -> bool:
  """Whether cuDNN's flash attention takes this model on any GPU JAX supports: fp16/bf16, head dim <= 128, x8."""
  return cfg.dtype in ('bfloat16', 'float16') and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0


def attention_plan(cfg: ModelConfig, backend: str, packed: bool, cached: bool, prompt: bool = False) -> AttentionPlan:
  """Which kernel computes attention, and how it is masked, for `model.attention` on `backend`.

  `packed`: rows may hold several documents (segment ids), so a token must not see the
  documents before its own. `cached`: a decode step, attending over a key/value cache.
  `prompt`: a prefill, whose keys and values go into the cache.

  - A decode step attends over the cache slots with XLA (`cache_attention`).
  - One document per row needs only the kernel's causal flag. cuDNN then runs its causal
    flash kernel; given a dense mask instead, JAX hands cuDNN a B x 1 x T x T bias, which
    it reads (and differentiates) in full: the slow path.
  - Packed rows need a mask: JAX 0.10's `jax.nn.dot_product_attention` takes no segment
    ids, so on GPU 'auto' uses XLA for them; 'cudnn' insists and takes the bias path.
  - 'splash' (TPU's Pallas kernel) handles causality and segments itself, on whole
    training sequences: it tiles them by 128, so a prompt of any length takes 'auto'.
  - 'auto' is cuDNN on GPU where it applies (bf16/fp16, head dim <= 128, a multiple
    of 8), else XLA; 'cudnn' elsewhere is refused here, not deep inside XLA.
  """
  if cached:
    return AttentionPlan('xla', 'cache')
  mask = 'segments' if packed else 'causal'
  attention = cfg.attention
  if attention == 'splash':
    if cfg.sliding_window:
      raise JaxgptError("model.attention='splash' has no sliding window here; with model.sliding_window use "
                        "'auto'.")
    if backend == 'gpu':
      raise JaxgptError("model.attention='splash' is a TPU kernel; on GPU use 'cudnn' (or 'auto').")
    if not prompt:
      return AttentionPlan('splash', 'segments')
    attention = 'auto'
  if attention == 'cudnn':
    if backend != 'gpu':
      raise JaxgptError(f"model.attention='cudnn' needs an NVIDIA GPU, and JAX runs on {backend} here: "
                        "use 'auto' (or 'xla').")
    if cfg.dtype not in ('bfloat16', 'float16'):
      raise JaxgptError(f"model.attention='cudnn' computes in bfloat16 or float16, and model.dtype is "
                        f"{cfg.dtype!r}: set model.dtype='auto' (bfloat16 on GPU), or use attention='auto'.")
    return AttentionPlan('cudnn', mask)
  if attention == 'auto' and backend == 'gpu' and not packed and _cudnn_applies(cfg):
    return AttentionPlan('cudnn', 'causal')
  return AttentionPlan('xla', mask)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """RoPE's angular frequency for each of the R/2 rotated pairs (R = rotary_dim, or the head dimension).

  With rope_scaling='llama3' (Llama 3.1's reference code, as transformers has it), wavelengths longer
  than rope_original_max_len / low_freq_factor are stretched by `factor`, those shorter than
  rope_original_max_len / high_freq_factor are kept, and those between are interpolated.
  """
  R = cfg.rotary_dim or cfg.head_dim
  inv_freq = cfg.rope_theta ** (-np.arange(0, R, 2) / R)
  if cfg.rope_scaling == 'llama3':
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    kept = np.clip((cfg.rope_original_max_len * inv_freq / (2 * np.pi) - low) / (high - low), 0, 1)
    inv_freq = (1 - kept) * inv_freq / cfg.rope_scaling_factor + kept * inv_freq
  return inv_freq.astype(np.float32)


def rotary(x_BxTxHxK, positions_BxT, inv_freq, interleaved: bool = False):
  """Rotary position embedding (RoPE) of each head's first R = 2 * len(inv_freq) dimensions; the rest pass.

  Pair j, rotated by angle position * inv_freq[j], is dimensions (j, j + R/2) (Llama's and NeoX's
  `rotate_half`), or (2j, 2j + 1) when interleaved (GPT-J's `rotate_every_two`).
  """
  R, K = 2 * len(inv_freq), x_BxTxHxK.shape[-1]
  angles_BxTxR2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  sin, cos = jnp.sin(angles_BxTxR2)[:, :, None], jnp.cos(angles_BxTxR2)[:, :, None]
  x32 = x_BxTxHxK.astype(jnp.float32)
  part = x32[..., :R] if R < K else x32
  x1, x2 = (part[..., 0::2], part[..., 1::2]) if interleaved else jnp.split(part, 2, axis=-1)
  y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
  rotated = jnp.stack([y1, y2], axis=-1).reshape(part.shape) if interleaved else jnp.concatenate([y1, y2], -1)
  if R < K:
    rotated = jnp.concatenate([rotated, x32[..., R:]], axis=-1)
  return rotated.astype(x_BxTxHxK.dtype)


def splash_attention(query_BxTxHxK, key_BxTxGxK, value_BxTxGxK, segment_ids_BxT):
  """Causal, within-segment attention by JAX's Pallas splash kernel.

  It is a TPU (Mosaic) kernel; on other backends Pallas interprets it, which is
  slow and only meant for checking it against the XLA path. XLA cannot
  partition a Pallas call, so under a mesh it runs per shard (shard_map):
  batch and heads split as the activation rules place them, the sequence whole.
  """
  T, K = query_BxTxHxK.shape[1], query_BxTxHxK.shape[3]
  block = next((b for b in (512, 256, 128) if T % b == 0), None)  # the largest tile that fits
  if block is None:
    raise JaxgptError(f"model.attention='splash' tiles the sequence by 128; {T} tokens is not a multiple.")
  tiles = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                            block_q_dq=block, block_kv_dq=block)

  def per_shard(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT):
    heads = q_BxTxHxK.shape[2]
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((T, T))] * heads),
                                    block_sizes=tiles, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != 'tpu')
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel takes [heads, T, K] per row
    out_BxHxTxK = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg)))(
        heads_first(q_BxTxHxK * K ** -0.5), heads_first(k_BxTxGxK), heads_first(v_BxTxGxK), seg_BxT)
    return jnp.swapaxes(out_BxHxTxK, 1, 2)

  args = (query_BxTxHxK, key_BxTxGxK, value_BxTxGxK, segment_ids_BxT)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_shard(*args)

  def split(axes, *sizes):
    """The mesh axes for a dimension, or None (replicated) where they do not divide it, as at init."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    devices = math.prod(mesh.shape[name] for name in names)
    return axes if all(size % devices == 0 for size in sizes) else None

  batch, _, heads, _ = nn.logical_to_mesh_axes(('act_batch', 'act_length', 'act_heads', 'act_kv'))
  batch = split(batch, query_BxTxHxK.shape[0])
  spec = P(batch, None, split(heads, query_BxTxHxK.shape[2], key_BxTxGxK.shape[2]), None)
  return jax.shard_map(per_shard, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                       check_vma=False)(*args)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); or, with parallel_residual,
  x + attn(norm(x)) + mlp(norm(x)) (GPT-J shares one norm between the two, GPT-NeoX has one each)."""
  cfg: ModelConfig
  deterministic: bool = True
  prefill: bool = False  # also return the tokens' keys and values, for a cache

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache=None):
    """Returns (x, cache): the (carry, output) pair that nn.scan expects.

    Without a cache, attention is over the T tokens given (S = T); segment ids
    None means one document per row. A prefill returns the tokens' keys and
    values ({'key', 'value'}: B x G x T x K) in place of a cache. With a cache
    (this layer's {'key', 'value'}: B x G x S x K), the new keys and values are
    written at `positions` and attention is over all S slots.
    """
    cfg = self.cfg
    B, T, D = x_BxTxD.shape
    H, G, K, M = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    dtype = jnp.dtype(cfg.dtype)
    # GPT-2 scales the init of the projections that write into the residual
    # stream by 1/sqrt(2 * layers) so the stream's variance does not grow with depth.
    resid_std = 0.02 / (2 * cfg.num_layers) ** 0.5

    def weight(name, shape, names, std=0.02):
      return self.param(name, _normal(std, names), shape).astype(dtype)

    def bias(name, shape, names, present=cfg.use_bias):
      if not present:
        return jnp.zeros((), dtype)
      return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, names), shape).astype(dtype)

    def dropout(y):
      return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

    def norm(name, x_BxTxD):
      return Norm(cfg.norm, cfg.norm_epsilon, name=name)(x_BxTxD).reshape(B * T, D)

    def mlp(h_NxD):
      mlp_bias = cfg.use_bias or cfg.mlp_bias
      up_NxM = h_NxD @ weight('mlp_up', (D, M), ('embed', 'mlp')) + bias('mlp_up_bias', (M,), ('mlp',), mlp_bias)
      if cfg.mlp == 'swiglu':
        gate_NxM = (h_NxD @ weight('mlp_gate', (D, M), ('embed', 'mlp'))
                    + bias('mlp_gate_bias', (M,), ('mlp',), mlp_bias))
        hidden_NxM = nn.silu(gate_NxM) * up_NxM
      else:
        hidden_NxM = nn.gelu(up_NxM, approximate=cfg.mlp == 'gelu')
      hidden_NxM = nn.with_logical_constraint(hidden_NxM, ('act_tokens', 'act_mlp'))
      down_NxD = hidden_NxM @ weight('mlp_down', (M, D), ('mlp', 'embed'), resid_std)
      return dropout(down_NxD + bias('mlp_down_bias', (D,), ('embed',), mlp_bias))

    # Dense layers run on 2-D [N, D] activations: XLA:CPU's backward pass is
    # about 2x faster that way than on [B, T, D] (docs/design.md).
    h_NxD = norm('ln_attn', x_BxTxD)
    inv_freq = rope_frequencies(cfg) if cfg.position == 'rope' else None
    qkv = []
    for name, heads, head_axis in (('query', H, 'heads'), ('key', G, 'kv_heads'), ('value', G, 'kv_heads')):
      w_DxHxK = weight(name, (D, heads, K), ('embed', head_axis, 'kv'))
      y_NxHxK = jnp.einsum('nd,dhk->nhk', h_NxD, w_DxHxK) + bias(f'{name}_bias', (heads, K), (head_axis, 'kv'),
                                                                 cfg.use_bias or cfg.qkv_bias)
      y_BxTxHxK = y_NxHxK.reshape(B, T, heads, K)
      if inv_freq is not None and name != 'value':
        y_BxTxHxK = rotary(y_BxTxHxK, positions_BxT, inv_freq, cfg.rope_interleaved)
      qkv.append(nn.with_logical_constraint(y_BxTxHxK, ('act_batch', 'act_length', 'act_heads', 'act_kv')))
    query_BxTxHxK, key_BxTxGxK, value_BxTxGxK = qkv
    # Grouped-query attention: every path shares each kv head across H // G query heads.
    plan = attention_plan(cfg, jax.default_backend(), packed=segment_ids_BxT is not None, cached=cache is not None,
                          prompt=self.prefill)
    if self.prefill:
      cache = {name: nn.with_logical_constraint(jnp.swapaxes(new, 1, 2), CACHE_AXES)
               for name, new in (('key', key_BxTxGxK), ('value', value_BxTxGxK))}
    if plan.mask == 'cache':
      rows_Bx1 = jnp.arange(B)[:, None]
      # cache[rows, :, positions] is B x T x G x K: the new keys and values go in as computed.
      cache = {name: nn.with_logical_constraint(cache[name].at[rows_Bx1, :, positions_BxT].set(new), CACHE_AXES)
               for name, new in (('key', key_BxTxGxK), ('value', value_BxTxGxK))}
      attn_BxTxHxK = cache_attention(query_BxTxHxK, cache['key'], cache['value'], positions_BxT, cfg.sliding_window)
    elif plan.implementation == 'splash':
      if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
      attn_BxTxHxK = splash_attention(query_BxTxHxK, key_BxTxGxK, value_BxTxGxK, segment_ids_BxT)
    else:
      # A sliding window is the causal kernels' local window, or part of the dense mask.
      causal = plan.mask == 'causal'
      attn_BxTxHxK = jax.nn.dot_product_attention(
          query_BxTxHxK, key_BxTxGxK, value_BxTxGxK, is_causal=causal,
          mask=None if causal else attention_mask(segment_ids_BxT, cfg.sliding_window),
          local_window_size=(cfg.sliding_window - 1, 0) if causal and cfg.sliding_window else None,
          implementation=plan.implementation)
    w_HxKxD = weight('out', (H, K, D), ('heads', 'kv', 'embed'), resid_std)
    attn_NxD = jnp.einsum('nhk,hkd->nd', attn_BxTxHxK.reshape(B * T, H, K), w_HxKxD)
    attn_NxD = dropout(attn_NxD + bias('out_bias', (D,), ('embed',)))
    if cfg.parallel_residual:  # the MLP reads the block's input too, not the attention's output
      if not cfg.shared_norm:
        h_NxD = norm('ln_mlp', x_BxTxD)
      x_BxTxD = x_BxTxD + (attn_NxD + mlp(h_NxD)).reshape(B, T, D)
    else:
      x_BxTxD = x_BxTxD + attn_NxD.reshape(B, T, D)
      x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed'))
      x_BxTxD = x_BxTxD + mlp(norm('ln_mlp', x_BxTxD)).reshape(B, T, D)
    return nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed')), cache


_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Like 'dots', but the saved matmul outputs wait in host memory instead of on the device.
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


class GPT(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None,
               deterministic: bool = True, cache=None, prefill: bool = False, return_hidden: bool = False):
    """Returns float32 logits [B, T, V], or (logits, updated cache) when given a cache.

    A prefill returns (logits, kv): each layer's keys and values of the tokens
    ({'key', 'value'}: tuples of one B x G x T x K array per layer), for the
    first T slots of a cache (`init_cache`).

    With return_hidden, returns (final hidden states [B*T, D] in float32, output
    projection [D, V]) instead of logits, for a loss that never holds all the
    logits at once (`chunked_cross_entropy`); with output_bias, D + 1 of them, the bias the projection's last row.

    segment_ids and positions come from packing several documents into one
    row: attention stays inside a document and positions restart at each one.
    Without them the row is one document starting at position 0. With a cache
    (from `init_cache`, one document per row; layers unrolled, see `unscanned`)
    positions say which slots the tokens fill; segment ids are not used.
    """
    cfg = self.cfg
    B, T = tokens_BxT.shape
    if cache is not None and (cfg.scan_layers or prefill):
      raise ValueError('a cache is read and written by decode steps of a model with unrolled layers '
                       '(`unscanned(model, params)`); a prefill starts a new one.')
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))

    wte_VxD = self.param('token_embedding', _normal(0.02, ('vocab', 'embed')), (cfg.vocab_size, cfg.embed_dim))
    x_BxTxD = wte_VxD[tokens_BxT]
    if cfg.position == 'learned':
      wpe_TxD = self.param('position_embedding', _normal(0.01, ('length', 'embed')), (cfg.max_len, cfg.embed_dim))
      x_BxTxD = x_BxTxD + wpe_TxD[positions_BxT]
    x_BxTxD = nn.Dropout(cfg.dropout_rate)(x_BxTxD.astype(cfg.dtype), deterministic=deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_length', 'act_embed'))

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      # One compiled block, applied num_layers times: compile time does not grow with depth.
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxD, kv = stack(cfg, deterministic, prefill, name='blocks')(x_BxTxD, segment_ids_BxT, positions_BxT)
      if prefill:  # stacked L x B x G x T x K by the scan
        cache = {name: tuple(layers[i] for i in range(cfg.num_layers)) for name, layers in kv.items()}
    else:
      layer_caches = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else {name: layers[i] for name, layers in cache.items()}
        x_BxTxD, layer_cache = block(cfg, deterministic, prefill, name=f'block_{i}')(
            x_BxTxD, segment_ids_BxT, positions_BxT, layer_cache)
        layer_caches.append(layer_cache)
      if cache is not None or prefill:
        cache = {name: tuple(layer[name] for layer in layer_caches) for name in ('key', 'value')}

    x_NxD = Norm(cfg.norm, cfg.norm_epsilon, name='ln_final')(x_BxTxD).reshape(B * T, -1).astype(jnp.float32)
    if cfg.tie_embeddings:  # GPT-2 reuses the input embedding as the output projection
      head_DxV = wte_VxD.T
    else:
      head_DxV = self.param('output', _normal(0.02, ('embed', 'vocab')), (cfg.embed_dim, cfg.vocab_size))
    if cfg.output_bias:
      # As a last row of the projection, read by a last hidden dimension of ones: the chunked loss
      # (return_hidden) then needs no bias of its own.
      bias_V = self.param('output_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                          (cfg.vocab_size,))
      x_NxD = jnp.concatenate([x_NxD, jnp.ones((B * T, 1), jnp.float32)], axis=1)
      head_DxV = jnp.concatenate([head_DxV, bias_V[None]], axis=0)
    if return_hidden:
      return x_NxD, head_DxV
    # Logits in float32 so the softmax is stable in bf16 runs.
    logits_BxTxV = (x_NxD @ head_DxV).reshape(B, T, cfg.vocab_size)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV, ('act_batch', 'act_length', 'act_vocab'))
    return logits_BxTxV if cache is None else (logits_BxTxV, cache)  # or a prefill's keys and values


def unscanned(model: GPT, params) -> tuple[GPT, dict]:
  """The same model with its layers unrolled (scan_layers=False), and `params` laid out for it.

  Decoding runs this: each layer then reads its own weights and cache buffers where
  they are, while a scanned decode step would copy every layer's slice of the stacked
  weights and cache (XLA does not hoist the weights' slices out of the decode loop).
  The layout change is one copy of the block weights, made where this is called.
  """
  if not model.cfg.scan_layers:
    return model, params
  return GPT(dataclasses.replace(model.cfg, scan_layers=False)), unstacked_layers(params)


def unstacked_layers(params: dict) -> dict:
  """Params whose layers are stacked under 'blocks' (nn.scan) as one 'block_{i}' per layer."""
  num_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  return {**{k: v for k, v in params.items() if k != 'blocks'},
          **{f'block_{i}': jax.tree.map(lambda x: x[i], params['blocks']) for i in range(num_layers)}}


def build_model(config, vocab_size: int) -> GPT:
  """The GPT that a run's config (its model section) describes, for a vocabulary of `vocab_size` tokens."""
  return GPT(ModelConfig.from_config(config.model, vocab_size))


def chunked_cross_entropy(hidden_NxD, head_DxV, targets_N, chunk: int):
  """Per-token cross-entropy [N], computing the logits `chunk` tokens at a time.

  Each chunk's [chunk, V] logits are rematerialised in the backward pass, so
  peak memory holds one chunk's logits instead of all N x V of them: with
  GPT-2's 50k vocabulary that is the largest activation of the step.
  """
  N, D = hidden_NxD.shape
  if N % chunk:
    raise ValueError(f'{N} tokens do not split into chunks of {chunk}')

  @jax.checkpoint
  def chunk_losses(h_CxD, t_C):
    logits_CxV = h_CxD @ head_DxV
    return jax.nn.logsumexp(logits_CxV, axis=-1) - jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]

  _, losses = jax.lax.scan(lambda _, xs: (None, chunk_losses(*xs)), None,
                           (hidden_NxD.reshape(N // chunk, chunk, D), targets_N.reshape(N // chunk, chunk)))
  return losses.reshape(N)


def token_losses(model, params, batch, rng=None):
  """Each target's cross-entropy, -log p(target), shaped like batch['targets'] (the loss mask not applied).

  The one path from a batch to per-token losses: the language-model loss and the preference losses
  (jaxgpt/preference.py) both read it.
  """
  chunk = model.cfg.loss_chunk
  outputs = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'],
                        deterministic=rng is None, rngs=None if rng is None else {'dropout': rng},
                        return_hidden=chunk > 0)
  if chunk:
    return chunked_cross_entropy(*outputs, batch['targets'].reshape(-1), chunk).reshape(batch['targets'].shape)
  return optax.softmax_cross_entropy_with_integer_labels(outputs, batch['targets'])


def loss_sums(model, params, batch, rng=None):
  """(sum of token losses, number of tokens) over the tokens the loss mask keeps.

  Sums rather than a mean so microbatches and eval batches combine exactly.
  """
  mask = batch['loss_mask'].astype(jnp.float32)
  return (token_losses(model, params, batch, rng) * mask).sum(), mask.sum()


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward): the one formula behind every MFU.

  Counts every matmul: 6 per weight in the blocks and the output projection,
  plus attention scores and their weighted sum. Causal attention computes half
  of the T x T scores that matter, so those count at half (6 * layers * T * D,
  not PaLM's 12 * layers * T * D), as MaxText has counted them since mid-2025:
  figures compare with its published tables.
  """
  D, M, L, K = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, cfg.head_dim
  attention_weights = D * K * (2 * cfg.num_heads + 2 * cfg.kv_heads)  # q, out, k, v
  mlp_weights = (3 if cfg.mlp == 'swiglu' else 2) * D * M
  matmul_params = L * (attention_weights + mlp_weights) + cfg.vocab_size * D
  return 6 * matmul_params + 6 * L * seq_len * D
