"""The Hugging Face formats of GPT-2, Llama (3.x too), Mistral, Qwen2, GPT-J and GPT-NeoX: configs, tensors, layouts.

A Hugging Face directory (local or in a bucket) holds `config.json`,
`model.safetensors` (or shards `model-00001-of-00002.safetensors`, ...) and the
tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`). Weights are read
and written with safetensors' numpy API: torch is not needed. The commands that use this are in
`jaxgpt.convert`; `--config.init_from` reads a HF directory through `load_hf`.

Each format is a set of jaxgpt's model switches (`_FORMATS`): GPT-2 is the default
architecture exactly (tanh-approximate GELU, as HF's `gelu_new`); Llama, Mistral and
Qwen2 are RoPE, RMSNorm and SwiGLU, with Llama 3's RoPE scaling, Mistral's sliding
window or Qwen2's query/key/value biases; GPT-J and GPT-NeoX are parallel blocks with
partial RoPE. HF Llama and NeoX rotate the two halves of each head's rotated part
(`rotate_half`), as `jaxgpt.model.rotary` does, and GPT-J rotates adjacent pairs, as
it does with rope_interleaved, so every weight maps without permutation.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import load_byte_level_bpe
from jaxgpt.model import GPT, ModelConfig, unstacked_layers

HF_CONFIG = 'config.json'
HF_WEIGHTS = 'model.safetensors'
HF_GENERATION_CONFIG = 'generation_config.json'
# HF activations jaxgpt computes exactly, as its model.mlp.
_GELUS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact'}
# Every architecture field an import sets: what a family's config does not say keeps ModelConfig's default.
IMPORTED_FIELDS = ('num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim', 'max_len', 'position',
                   'rope_theta', 'rotary_dim', 'rope_interleaved', 'rope_scaling', 'rope_scaling_factor',
                   'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_len', 'sliding_window',
                   'norm', 'norm_epsilon', 'mlp', 'use_bias', 'qkv_bias', 'mlp_bias', 'output_bias',
                   'parallel_residual', 'shared_norm', 'tie_embeddings')


def is_hf_directory(path: str) -> bool:
  return bool(_weight_files(paths.path(path)))


def _weight_files(directory) -> list:
  return sorted(directory.glob('model*.safetensors')) if directory.is_dir() else []


# --- architecture: HF config.json -> jaxgpt model fields -----------------------------------------

def model_fields(hf: dict) -> dict:
  """The config.model fields of the architecture a HF config.json describes, or a JaxgptError."""
  kind = hf.get('model_type')
  if kind not in _FIELD_READERS:
    raise JaxgptError(f'cannot convert a Hugging Face {kind!r} model: jaxgpt reads {", ".join(_FORMATS)}.')
  problems = []
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in IMPORTED_FIELDS}
  fields = {**defaults, **_FIELD_READERS[kind](hf, problems)}
  if problems:
    raise JaxgptError(f'this {kind} model differs from what jaxgpt computes: {"; ".join(problems)}.')
  return fields


def _mlp(activation: str, key: str, problems: list) -> str:
  if activation not in _GELUS:
    problems.append(f'{key}={activation!r} (jaxgpt computes the GELU: {", ".join(_GELUS)})')
  return _GELUS.get(activation, 'gelu')


def _rope(hf: dict, head_dim: int, problems: list, rotated_fraction: float = 1.0) -> dict:
  """RoPE's fields, from the legacy keys (rope_theta, rope_scaling, rotary_pct) or transformers 5's rope_parameters."""
  rope = {**(hf.get('rope_scaling') or {}), **(hf.get('rope_parameters') or {})}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  theta = rope.get('rope_theta') or hf.get('rope_theta') or hf.get('rotary_emb_base') or 10000.0
  fraction = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', hf.get('rotary_pct', rotated_fraction)))
  rotary_dim = int(head_dim * fraction)  # as transformers rounds it
  fields = dict(position='rope', rope_theta=float(theta), rotary_dim=0 if rotary_dim == head_dim else rotary_dim)
  if kind == 'llama3':
    fields.update(rope_scaling='llama3', rope_scaling_factor=float(rope['factor']),
                  rope_low_freq_factor=float(rope['low_freq_factor']),
                  rope_high_freq_factor=float(rope['high_freq_factor']),
                  rope_original_max_len=int(rope.get('original_max_position_embeddings',
                                                     hf['max_position_embeddings'])))
  elif kind != 'default':
    problems.append(f"RoPE scaling {kind!r} (jaxgpt computes plain RoPE and Llama 3's 'llama3')")
  return fields


def _gpt2_fields(hf: dict, problems: list) -> dict:
  if hf.get('scale_attn_by_inverse_layer_idx') or not hf.get('scale_attn_weights', True):
    problems.append('non-standard attention scaling')
  return dict(num_layers=hf['n_layer'], num_heads=hf['n_head'], embed_dim=hf['n_embd'],
              mlp_dim=hf.get('n_inner') or 4 * hf['n_embd'], max_len=hf['n_positions'], position='learned',
              norm='layernorm', norm_epsilon=hf.get('layer_norm_epsilon', 1e-5),
              mlp=_mlp(hf.get('activation_function', 'gelu_new'), 'activation_function', problems),
              use_bias=True, tie_embeddings=hf.get('tie_word_embeddings', True))


def _llama_fields(hf: dict, problems: list) -> dict:
  """Llama, Mistral and Qwen2: RoPE, RMSNorm, SwiGLU, with Qwen2's query/key/value biases and Mistral's window."""
  kind, width, heads = hf['model_type'], hf['hidden_size'], hf['num_attention_heads']
  if hf.get('hidden_act', 'silu') != 'silu':
    problems.append(f'hidden_act={hf["hidden_act"]!r} (jaxgpt SwiGLU uses silu)')
  head_dim = hf.get('head_dim') or width // heads
  if head_dim * heads != width:
    problems.append(f'head_dim={head_dim} * num_attention_heads={heads} != hidden_size={width} (jaxgpt\'s '
                    'head dimension is hidden_size / heads)')
  attention_bias, mlp_bias = hf.get('attention_bias', False), hf.get('mlp_bias', False)
  if attention_bias and not mlp_bias:  # jaxgpt's use_bias is both
    problems.append('attention biases without MLP biases')
  return dict(num_layers=hf['num_hidden_layers'], num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or 0,
              embed_dim=width, mlp_dim=hf['intermediate_size'], max_len=hf['max_position_embeddings'],
              **_rope(hf, head_dim, problems), sliding_window=_sliding_window(hf, problems), norm='rmsnorm',
              norm_epsilon=hf.get('rms_norm_eps', 1e-6), mlp='swiglu', use_bias=attention_bias,
              qkv_bias=kind == 'qwen2', mlp_bias=mlp_bias and not attention_bias,
              tie_embeddings=hf.get('tie_word_embeddings', False))


def _sliding_window(hf: dict, problems: list) -> int:
  """Mistral's window, or Qwen2's when use_sliding_window: 0 when the model has none."""
  kind, window = hf['model_type'], hf.get('sliding_window') or 0
  if kind == 'llama' or not window or (kind == 'qwen2' and not hf.get('use_sliding_window')):
    return 0
  layer_types = hf.get('layer_types') or [  # Qwen2 slides from layer max_window_layers on
      'sliding_attention' if kind == 'mistral' or i >= hf.get('max_window_layers', 28) else 'full_attention'
      for i in range(hf['num_hidden_layers'])]
  if len(set(layer_types)) > 1:
    problems.append('a sliding window in some layers only (jaxgpt\'s model.sliding_window is every layer\'s)')
  return window if layer_types[0] == 'sliding_attention' else 0


def _gptj_fields(hf: dict, problems: list) -> dict:
  width, heads = hf['n_embd'], hf['n_head']
  rotary_dim = hf.get('rotary_dim')
  if not rotary_dim:
    problems.append('no rotary_dim (GPT-J then rotates by hidden_size, not the head dimension)')
  return dict(num_layers=hf['n_layer'], num_heads=heads, embed_dim=width, mlp_dim=hf.get('n_inner') or 4 * width,
              max_len=hf['n_positions'], position='rope', rotary_dim=0 if rotary_dim == width // heads else rotary_dim,
              rope_interleaved=True, norm='layernorm', norm_epsilon=hf.get('layer_norm_epsilon', 1e-5),
              mlp=_mlp(hf.get('activation_function', 'gelu_new'), 'activation_function', problems), use_bias=False,
              mlp_bias=True, output_bias=True, parallel_residual=True, shared_norm=True,
              tie_embeddings=hf.get('tie_word_embeddings', False))


def _neox_fields(hf: dict, problems: list) -> dict:
  width, heads = hf['hidden_size'], hf['num_attention_heads']
  attention_bias = hf.get('attention_bias', True)
  return dict(num_layers=hf['num_hidden_layers'], num_heads=heads, embed_dim=width, mlp_dim=hf['intermediate_size'],
              max_len=hf['max_position_embeddings'], **_rope(hf, width // heads, problems, rotated_fraction=0.25),
              norm='layernorm', norm_epsilon=hf.get('layer_norm_eps', 1e-5),
              mlp=_mlp(hf.get('hidden_act', 'gelu'), 'hidden_act', problems), use_bias=attention_bias,
              mlp_bias=not attention_bias, parallel_residual=hf.get('use_parallel_residual', True),
              tie_embeddings=hf.get('tie_word_embeddings', False))


_FIELD_READERS = {'gpt2': _gpt2_fields, 'llama': _llama_fields, 'mistral': _llama_fields, 'qwen2': _llama_fields,
                  'gptj': _gptj_fields, 'gpt_neox': _neox_fields}


# --- architecture: jaxgpt model fields -> HF format and config.json ------------------------------

_GELU = {'gelu', 'gelu_exact'}
_ALL_BIASES = ('qkv', 'out', 'mlp')
_LLAMA = dict(position={'rope'}, norm={'rmsnorm'}, mlp={'swiglu'}, parallel_residual={False}, partial_rotary={False},
              rope_interleaved={False}, rope_scaling={'none', 'llama3'})
# What each format computes, as the values of `_traits` it allows (a trait not named may be anything). A model
# exports to the first format that allows all of its traits.
_FORMATS = {
    'gpt2': dict(position={'learned'}, norm={'layernorm'}, mlp=_GELU, biases={_ALL_BIASES}, tie_embeddings={True},
                 parallel_residual={False}, grouped_query={False}, sliding_window={0}),
    'llama': dict(**_LLAMA, biases={(), ('mlp',), _ALL_BIASES}, sliding_window={0}),
    'qwen2': dict(**_LLAMA, biases={('qkv',)}, sliding_window={0}),
    'mistral': dict(**_LLAMA, biases={()}),
    'gptj': dict(position={'rope'}, norm={'layernorm'}, mlp=_GELU, biases={('mlp', 'output')},
                 parallel_residual={True}, shared_norm={True}, rope_interleaved={True}, rope_scaling={'none'},
                 rope_theta={10000.0}, grouped_query={False}, sliding_window={0}),
    'gpt_neox': dict(position={'rope'}, norm={'layernorm'}, mlp=_GELU, biases={_ALL_BIASES, ('mlp',)},
                     shared_norm={False}, rope_interleaved={False}, rope_scaling={'none'}, grouped_query={False},
                     sliding_window={0}),
}
_MODEL_CLASSES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM', 'gptj': 'GPTJForCausalLM', 'gpt_neox': 'GPTNeoXForCausalLM'}


def _model_config(model_cfg) -> ModelConfig:
  """A config's model section as a ModelConfig: fields a run saved before they existed take their defaults."""
  if isinstance(model_cfg, ModelConfig):
    return model_cfg
  return ModelConfig.from_config(model_cfg, vocab_size=0, backend='cpu')


def _traits(m: ModelConfig) -> dict:
  biases = (('qkv', m.use_bias or m.qkv_bias), ('out', m.use_bias), ('mlp', m.use_bias or m.mlp_bias),
            ('output', m.output_bias))
  return {**{name: getattr(m, name) for name in (
              'position', 'norm', 'mlp', 'tie_embeddings', 'parallel_residual', 'shared_norm', 'rope_interleaved',
              'rope_scaling', 'rope_theta', 'sliding_window')},
          'biases': tuple(group for group, present in biases if present),
          'grouped_query': m.kv_heads != m.num_heads, 'partial_rotary': m.rotary_dim not in (0, m.head_dim)}


def architecture(model_cfg) -> str:
  """The HF format ('gpt2', 'llama', 'mistral', 'qwen2', 'gptj' or 'gpt_neox') a jaxgpt model exports to, or a
  JaxgptError saying what the nearest format computes differently."""
  traits = _traits(_model_config(model_cfg))
  misfits = {kind: [f'{trait} {" or ".join(map(repr, sorted(allowed)))} (this model: {traits[trait]!r})'
                    for trait, allowed in allowed_traits.items() if traits[trait] not in allowed]
             for kind, allowed_traits in _FORMATS.items()}
  kind = min(misfits, key=lambda k: len(misfits[k]))  # the first of the nearest
  if misfits[kind]:
    raise JaxgptError(f'this model has no Hugging Face format: the nearest, {_MODEL_CLASSES[kind]}, needs '
                      f'{"; ".join(misfits[kind])}.')
  return kind


def hf_config(model_cfg, vocab_size: int, eos_id: int, bos_id: int | None = None) -> dict:
  """config.json of the HF format the model exports to. BOS is EOS unless given (GPT-2 uses one token for both)."""
  m, kind = _model_config(model_cfg), architecture(model_cfg)
  head_dim = m.head_dim
  activation = 'gelu_new' if m.mlp == 'gelu' else 'gelu'
  config = {'architectures': [_MODEL_CLASSES[kind]], 'model_type': kind, 'vocab_size': vocab_size,
            'bos_token_id': eos_id if bos_id is None else bos_id, 'eos_token_id': eos_id,
            'tie_word_embeddings': m.tie_embeddings, 'torch_dtype': 'float32'}
  if kind in ('gpt2', 'gptj'):
    config.update(n_positions=m.max_len, n_embd=m.embed_dim, n_layer=m.num_layers, n_head=m.num_heads,
                  n_inner=m.mlp_dim, activation_function=activation, layer_norm_epsilon=m.norm_epsilon,
                  resid_pdrop=m.dropout_rate, embd_pdrop=m.dropout_rate, attn_pdrop=0.0)
    if kind == 'gptj':
      config['rotary_dim'] = m.rotary_dim or head_dim
    return config
  config.update(max_position_embeddings=m.max_len, hidden_size=m.embed_dim, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim)
  if kind == 'gpt_neox':
    rotary_pct = (m.rotary_dim or head_dim) / head_dim
    if int(head_dim * rotary_pct) != (m.rotary_dim or head_dim):
      raise JaxgptError(f'GPT-NeoX stores rotary_dim as a fraction of the head dimension, and {m.rotary_dim}/'
                        f'{head_dim} does not round back to it: choose a rotary_dim that is.')
    config.update(hidden_act=activation, layer_norm_eps=m.norm_epsilon, rotary_pct=rotary_pct,
                  rotary_emb_base=m.rope_theta, use_parallel_residual=m.parallel_residual, attention_bias=m.use_bias)
    return config
  config.update(num_key_value_heads=m.num_kv_heads or m.num_heads, hidden_act='silu', rms_norm_eps=m.norm_epsilon,
                rope_theta=m.rope_theta)
  if m.rope_scaling == 'llama3':
    config['rope_scaling'] = {'rope_type': 'llama3', 'factor': m.rope_scaling_factor,
                              'low_freq_factor': m.rope_low_freq_factor, 'high_freq_factor': m.rope_high_freq_factor,
                              'original_max_position_embeddings': m.rope_original_max_len}
  if kind == 'llama':
    config.update(attention_bias=m.use_bias, mlp_bias=m.use_bias or m.mlp_bias)
  elif kind == 'mistral':
    config['sliding_window'] = m.sliding_window or None
  else:
    config.update(use_sliding_window=False, sliding_window=None)
  return config


def eos_ids(directory: str) -> tuple[int, ...]:
  """The ids that end the HF model's text: generation_config.json's where it says, else config.json's (Llama 3
  Instruct has several: <|eot_id|> ends a turn, <|end_of_text|> a text); () when neither says."""
  eos = None
  for name in (HF_CONFIG, HF_GENERATION_CONFIG):
    path = paths.path(directory) / name
    if path.exists():
      eos = json.loads(path.read_text()).get('eos_token_id', eos)
  return tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)


# --- weights: HF tensors <-> jaxgpt params, one layer at a time ----------------------------------
# HF GPT-2 uses Conv1D, whose weight is [in, out], and fuses query, key and value one after the other.

def _gpt2_layer_from_hf(take, head_dim: int) -> dict:
  q, k, v = np.split(take('attn.c_attn.weight'), 3, axis=1)
  qb, kb, vb = np.split(take('attn.c_attn.bias'), 3)
  heads = lambda x: x.reshape(*x.shape[:-1], -1, head_dim)
  return {'ln_attn': {'scale': take('ln_1.weight'), 'bias': take('ln_1.bias')},
          'query': heads(q), 'key': heads(k), 'value': heads(v),
          'query_bias': heads(qb), 'key_bias': heads(kb), 'value_bias': heads(vb),
          'out': take('attn.c_proj.weight').reshape(-1, head_dim, q.shape[0]), 'out_bias': take('attn.c_proj.bias'),
          'ln_mlp': {'scale': take('ln_2.weight'), 'bias': take('ln_2.bias')},
          'mlp_up': take('mlp.c_fc.weight'), 'mlp_up_bias': take('mlp.c_fc.bias'),
          'mlp_down': take('mlp.c_proj.weight'), 'mlp_down_bias': take('mlp.c_proj.bias')}


def _gpt2_layer_to_hf(p: dict) -> dict:
  D = p['query'].shape[0]
  flat = lambda x: x.reshape(*x.shape[:-2], -1)
  return {'ln_1.weight': p['ln_attn']['scale'], 'ln_1.bias': p['ln_attn']['bias'],
          'attn.c_attn.weight': np.concatenate([flat(p[n]) for n in ('query', 'key', 'value')], axis=1),
          'attn.c_attn.bias': np.concatenate([flat(p[f'{n}_bias']) for n in ('query', 'key', 'value')]),
          'attn.c_proj.weight': p['out'].reshape(D, D), 'attn.c_proj.bias': p['out_bias'],
          'ln_2.weight': p['ln_mlp']['scale'], 'ln_2.bias': p['ln_mlp']['bias'],
          'mlp.c_fc.weight': p['mlp_up'], 'mlp.c_fc.bias': p['mlp_up_bias'],
          'mlp.c_proj.weight': p['mlp_down'], 'mlp.c_proj.bias': p['mlp_down_bias']}


# The other formats use nn.Linear, [out, in], with a bias where the format has one; which HF tensor is which
# jaxgpt param: norms, linear layers, and GPT-NeoX's fused query/key/value.
_QKV = ('query', 'key', 'value')
_LLAMA_LAYER = {'norms': {'ln_attn': 'input_layernorm', 'ln_mlp': 'post_attention_layernorm'},
                'linears': {'query': 'self_attn.q_proj', 'key': 'self_attn.k_proj', 'value': 'self_attn.v_proj',
                            'out': 'self_attn.o_proj', 'mlp_gate': 'mlp.gate_proj', 'mlp_up': 'mlp.up_proj',
                            'mlp_down': 'mlp.down_proj'}}
_GPTJ_LAYER = {'norms': {'ln_attn': 'ln_1'},
               'linears': {'query': 'attn.q_proj', 'key': 'attn.k_proj', 'value': 'attn.v_proj',
                           'out': 'attn.out_proj', 'mlp_up': 'mlp.fc_in', 'mlp_down': 'mlp.fc_out'}}
# NeoX fuses query, key and value per head: its rows are head 0's query, key and value, then head 1's, ...
_NEOX_LAYER = {'norms': {'ln_attn': 'input_layernorm', 'ln_mlp': 'post_attention_layernorm'},
               'linears': {'out': 'attention.dense', 'mlp_up': 'mlp.dense_h_to_4h', 'mlp_down': 'mlp.dense_4h_to_h'},
               'fused_qkv': 'attention.query_key_value'}


def _norm_from_hf(take, has, name: str) -> dict:
  return {'scale': take(f'{name}.weight'), **({'bias': take(f'{name}.bias')} if has(f'{name}.bias') else {})}


def _norm_to_hf(p: dict, name: str) -> dict:
  return {f'{name}.weight': p['scale'], **({f'{name}.bias': p['bias']} if 'bias' in p else {})}


def _linear_layer_from_hf(take, has, head_dim: int, spec: dict) -> dict:
  p = {norm: _norm_from_hf(take, has, name) for norm, name in spec['norms'].items()}
  fused = spec.get('fused_qkv')
  if fused:
    w_Hx3xKxD = take(f'{fused}.weight').reshape(-1, 3, head_dim, take(f'{fused}.weight').shape[1])
    p.update({name: w_Hx3xKxD[:, i].transpose(2, 0, 1) for i, name in enumerate(_QKV)})
    if has(f'{fused}.bias'):
      b_Hx3xK = take(f'{fused}.bias').reshape(-1, 3, head_dim)
      p.update({f'{name}_bias': b_Hx3xK[:, i] for i, name in enumerate(_QKV)})
  for name, hf_name in spec['linears'].items():
    w = take(f'{hf_name}.weight').T  # [in, out]
    p[name] = (w.reshape(w.shape[0], -1, head_dim) if name in _QKV else
               w.reshape(-1, head_dim, w.shape[1]) if name == 'out' else w)
    if has(f'{hf_name}.bias'):
      b = take(f'{hf_name}.bias')
      p[f'{name}_bias'] = b.reshape(-1, head_dim) if name in _QKV else b
  return p


def _linear_layer_to_hf(p: dict, spec: dict) -> dict:
  tensors = {}
  for norm, name in spec['norms'].items():
    tensors.update(_norm_to_hf(p[norm], name))
  fused = spec.get('fused_qkv')
  if fused:
    tensors[f'{fused}.weight'] = np.stack([p[n].transpose(1, 2, 0) for n in _QKV], axis=1).reshape(
        -1, p['query'].shape[0])
    if 'query_bias' in p:
      tensors[f'{fused}.bias'] = np.stack([p[f'{n}_bias'] for n in _QKV], axis=1).reshape(-1)
  for name, hf_name in spec['linears'].items():
    w = p[name].reshape(-1, p[name].shape[-1]) if name == 'out' else p[name].reshape(p[name].shape[0], -1)
    tensors[f'{hf_name}.weight'] = w.T
    if f'{name}_bias' in p:
      tensors[f'{hf_name}.bias'] = p[f'{name}_bias'].reshape(-1)
  return tensors


# Per format: where the layers and the other tensors live in HF names (after `prefix`, which GPT-2 checkpoints
# may also lack), and how a layer's tensors map. `output` lists the output projection's names, the one
# written first (GPT-NeoX checkpoints say embed_out, transformers 5's classes lm_head).
_LLAMA_LAYOUT = {'prefix': '', 'layer': 'model.layers.{i}.', 'spec': _LLAMA_LAYER,
                 'token_embedding': 'model.embed_tokens.weight', 'ln_final': 'model.norm', 'output': ('lm_head',)}
_LAYOUT = {
    'gpt2': {'prefix': 'transformer.', 'layer': 'h.{i}.', 'token_embedding': 'wte.weight',
             'position_embedding': 'wpe.weight', 'ln_final': 'ln_f', 'output': ('lm_head',)},
    'llama': _LLAMA_LAYOUT, 'mistral': _LLAMA_LAYOUT, 'qwen2': _LLAMA_LAYOUT,
    'gptj': {'prefix': 'transformer.', 'layer': 'h.{i}.', 'spec': _GPTJ_LAYER, 'token_embedding': 'wte.weight',
             'ln_final': 'ln_f', 'output': ('lm_head',)},
    'gpt_neox': {'prefix': 'gpt_neox.', 'layer': 'layers.{i}.', 'spec': _NEOX_LAYER,
                 'token_embedding': 'embed_in.weight', 'ln_final': 'final_layer_norm',
                 'output': ('embed_out', 'lm_head')},
}


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor in the directory's safetensors files, as float32 numpy arrays."""
  tensors = {}
  for path in _weight_files(paths.path(directory)):
    if paths.is_remote(path):  # safe_open maps local files only: a bucket's file is read whole
      tensors.update((name, t.astype(np.float32)) for name, t in safetensors.numpy.load(path.read_bytes()).items())
      continue
    with safetensors.numpy.safe_open(str(path), framework='np') as f:  # one tensor in memory at a time
      for name in f.keys():
        tensors[name] = f.get_tensor(name).astype(np.float32)
  return tensors


def params_from_hf(tensors: dict, fields: dict, kind: str) -> dict:
  """jaxgpt params (layers stacked, as nn.scan keeps them) from HF tensors."""
  layout = _LAYOUT[kind]
  tensors = {n.removeprefix(layout['prefix']): t for n, t in tensors.items()}

  def taker(prefix=''):
    def take(name):
      if prefix + name not in tensors:
        raise JaxgptError(f'the Hugging Face checkpoint has no tensor {prefix + name!r}: it is not a complete '
                          f'{kind} model.')
      return tensors[prefix + name]
    return take, lambda name: prefix + name in tensors

  head_dim = fields['embed_dim'] // fields['num_heads']
  layers = []
  for i in range(fields['num_layers']):
    take, has = taker(layout['layer'].format(i=i))
    layers.append(_gpt2_layer_from_hf(take, head_dim) if kind == 'gpt2' else
                  _linear_layer_from_hf(take, has, head_dim, layout['spec']))
  take, has = taker()
  params = {'token_embedding': take(layout['token_embedding']),
            'blocks': jax.tree.map(lambda *xs: np.stack(xs), *layers),
            'ln_final': _norm_from_hf(take, has, layout['ln_final'])}
  if 'position_embedding' in layout:
    params['position_embedding'] = take(layout['position_embedding'])
  output = next((name for name in layout['output'] if has(f'{name}.weight')), layout['output'][0])
  if not fields['tie_embeddings']:
    params['output'] = take(f'{output}.weight').T
  if fields['output_bias']:
    params['output_bias'] = take(f'{output}.bias')
  return params


def params_to_hf(params: dict, kind: str) -> dict[str, np.ndarray]:
  layout = _LAYOUT[kind]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), stacked(params))
  tensors = {layout['token_embedding']: params['token_embedding'], **_norm_to_hf(params['ln_final'],
                                                                                 layout['ln_final'])}
  if 'position_embedding' in layout:
    tensors[layout['position_embedding']] = params['position_embedding']
  num_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  for i in range(num_layers):
    layer = jax.tree.map(lambda x: x[i], params['blocks'])
    layer = _gpt2_layer_to_hf(layer) if kind == 'gpt2' else _linear_layer_to_hf(layer, layout['spec'])
    tensors.update({layout['layer'].format(i=i) + n: t for n, t in layer.items()})
  tensors = {layout['prefix'] + n: t for n, t in tensors.items()}
  if 'output' in params:
    tensors[f'{layout["output"][0]}.weight'] = params['output'].T
  if 'output_bias' in params:
    tensors[f'{layout["output"][0]}.bias'] = params['output_bias']
  return {n: np.ascontiguousarray(t) for n, t in tensors.items()}


def stacked(params: dict) -> dict:
  """Params with layers stacked under 'blocks' (scan_layers=True's layout) whichever layout they are in."""
  per_layer = sorted((k for k in params if k.startswith('block_')), key=lambda k: int(k.split('_')[1]))
  if not per_layer:
    return params
  rest = {k: v for k, v in params.items() if k not in per_layer}
  return {**rest, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in per_layer])}


def params_in_layout(params: dict, scan_layers: bool) -> dict:
  """Stacked params as the model wants them: stacked (nn.scan), or one 'block_{i}' per layer."""
  return params if scan_layers else unstacked_layers(params)


def _check_params(params: dict, fields: dict, vocab_size: int, directory: str) -> None:
  """Refuses params that are not exactly the model's (a tensor missing, extra or of another shape), naming them."""
  model = GPT(ModelConfig(vocab_size=vocab_size, **fields))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']
  shapes = lambda tree: {jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in jax.tree.leaves_with_path(tree)}
  wanted, got = shapes(nn.meta.unbox(abstract)), shapes(params)
  wrong = sorted(f'{name}: {got.get(name)} for {shape}' for name, shape in wanted.items() if got.get(name) != shape)
  wrong += sorted(f'{name}: not in the model' for name in set(got) - set(wanted))
  if wrong:
    raise JaxgptError(f'the weights in {directory} do not fit the architecture its {HF_CONFIG} describes '
                      f'({"; ".join(wrong[:5])}): the checkpoint is incomplete or its config is not its own.')


# --- whole checkpoints ---------------------------------------------------------------------------

def load_hf(directory: str):
  """(model fields, tokenizer, params) from a Hugging Face directory.

  Embedding rows past the tokenizer's vocabulary (GPT-J, Pythia and Qwen2 pad theirs to a round number)
  are dropped: no token reaches them, and jaxgpt's vocabulary is its tokenizer's.
  """
  directory = paths.expand(directory)
  config_path = paths.path(directory) / HF_CONFIG
  if not config_path.exists() or not is_hf_directory(directory):
    raise JaxgptError(f'{directory} is not a Hugging Face model directory (it needs {HF_CONFIG} and '
                      f'{HF_WEIGHTS}). Download one with `huggingface-cli download gpt2 --local-dir DIR`.')
  hf = json.loads(config_path.read_text())
  fields = model_fields(hf)
  tokenizer = load_byte_level_bpe(tokenizer_path(directory), _eos_token(directory), _bos_token(directory))
  model_eos = eos_ids(directory)
  if model_eos and tokenizer.eos_id not in model_eos:  # documents would end with a token the model does not stop at
    raise JaxgptError(f'the tokenizer in {directory} ends text with {tokenizer.eos_token!r} (id {tokenizer.eos_id}) '
                      f'and the model with ids {list(model_eos)} ({HF_GENERATION_CONFIG}, else {HF_CONFIG}): set '
                      'eos_token in its tokenizer_config.json to the model\'s.')
  vocab = tokenizer.vocab_size
  if vocab > hf['vocab_size']:
    raise JaxgptError(f'the tokenizer in {directory} has {vocab} tokens but the model only {hf["vocab_size"]} '
                      'embeddings: they are not each other\'s.')
  params = params_from_hf(read_safetensors(directory), fields, hf['model_type'])
  params['token_embedding'] = params['token_embedding'][:vocab]
  if 'output' in params:
    params['output'] = params['output'][:, :vocab]
  if 'output_bias' in params:
    params['output_bias'] = params['output_bias'][:vocab]
  _check_params(params, fields, vocab, directory)
  return fields, tokenizer, params


def tokenizer_path(directory: str) -> str:
  """tokenizer.json when the directory has one (it holds the exact pre-tokenizer), else the directory
  (vocab.json + merges.txt)."""
  tokenizer_json = paths.path(directory) / 'tokenizer.json'
  return str(tokenizer_json) if tokenizer_json.exists() else directory


def _eos_token(directory: str) -> str:
  """The end-of-text token: tokenizer_config.json's, else GPT-2's."""
  return _tokenizer_config_token(directory, 'eos_token') or '<|endoftext|>'


def _bos_token(directory: str) -> str:
  """The beginning-of-text token: tokenizer_config.json's (Llama 3's <|begin_of_text|>); '' = EOS's, as GPT-2."""
  return _tokenizer_config_token(directory, 'bos_token')


def _tokenizer_config_token(directory: str, name: str) -> str:
  path = paths.path(directory) / 'tokenizer_config.json'
  token = json.loads(path.read_text()).get(name) if path.exists() else None
  return (token['content'] if isinstance(token, dict) else token) or ''
