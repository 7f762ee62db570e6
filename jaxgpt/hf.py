"""The Hugging Face formats of GPT-2 and Llama: configs, tensor names and layouts.

A Hugging Face directory (local or in a bucket) holds `config.json`,
`model.safetensors` (or shards `model-00001-of-00002.safetensors`, ...) and the
tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`). Weights are read
and written with safetensors' numpy API: torch is not needed. The commands that use this are in
`jaxgpt.convert`; `--config.init_from` reads a HF directory through `load_hf`.

jaxgpt's default architecture is GPT-2 exactly (tanh-approximate GELU, as HF's
`gelu_new`; LayerNorm epsilon 1e-5). With RoPE, RMSNorm, SwiGLU, no biases it
is Llama: HF Llama rotates the two halves of each head (`rotate_half`), the same
pairing as `jaxgpt.model.rotary`, so the weights map without permutation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import load_byte_level_bpe
from jaxgpt.model import unstacked_layers

HF_CONFIG = 'config.json'
HF_WEIGHTS = 'model.safetensors'
_NORM_EPSILON = 1e-5  # jaxgpt.model.Norm's
_TANH_GELU = ('gelu_new', 'gelu_pytorch_tanh')


def is_hf_directory(path: str) -> bool:
  return bool(_weight_files(paths.path(path)))


def _weight_files(directory) -> list:
  return sorted(directory.glob('model*.safetensors')) if directory.is_dir() else []


# --- architecture: HF config <-> jaxgpt model fields ---------------------------------------------

def model_fields(hf: dict) -> dict:
  """The config.model fields of the architecture a HF config.json describes, or a JaxgptError."""
  kind = hf.get('model_type')
  problems = []
  if kind == 'gpt2':
    if hf.get('activation_function', 'gelu_new') not in _TANH_GELU:
      problems.append(f'activation_function={hf["activation_function"]!r} (jaxgpt uses the tanh GELU, gelu_new)')
    if hf.get('scale_attn_by_inverse_layer_idx') or not hf.get('scale_attn_weights', True):
      problems.append('non-standard attention scaling')
    epsilon = hf.get('layer_norm_epsilon', 1e-5)
    fields = dict(num_layers=hf['n_layer'], num_heads=hf['n_head'], num_kv_heads=0, embed_dim=hf['n_embd'],
                  mlp_dim=hf.get('n_inner') or 4 * hf['n_embd'], max_len=hf['n_positions'], position='learned',
                  norm='layernorm', mlp='gelu', use_bias=True, tie_embeddings=hf.get('tie_word_embeddings', True))
  elif kind == 'llama':
    if hf.get('hidden_act', 'silu') != 'silu':
      problems.append(f'hidden_act={hf["hidden_act"]!r} (jaxgpt SwiGLU uses silu)')
    if hf.get('rope_scaling'):
      problems.append(f'rope_scaling={hf["rope_scaling"]} (jaxgpt has plain RoPE)')
    if hf.get('attention_bias') or hf.get('mlp_bias'):
      problems.append('biases in attention or MLP')
    if hf.get('head_dim', hf['hidden_size'] // hf['num_attention_heads']) * hf['num_attention_heads'] != hf['hidden_size']:
      problems.append('head_dim * num_attention_heads != hidden_size')
    epsilon = hf.get('rms_norm_eps', 1e-6)
    rope_theta = hf.get('rope_theta') or (hf.get('rope_parameters') or {}).get('rope_theta', 10000.0)
    fields = dict(num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
                  num_kv_heads=hf.get('num_key_value_heads') or 0, embed_dim=hf['hidden_size'],
                  mlp_dim=hf['intermediate_size'], max_len=hf['max_position_embeddings'], position='rope',
                  rope_theta=float(rope_theta), norm='rmsnorm', mlp='swiglu', use_bias=False,
                  tie_embeddings=hf.get('tie_word_embeddings', False))
  else:
    raise JaxgptError(f'cannot convert a Hugging Face {kind!r} model: jaxgpt reads GPT-2 and Llama.')
  if abs(epsilon - _NORM_EPSILON) > 1e-12:
    problems.append(f'norm epsilon {epsilon} (jaxgpt uses {_NORM_EPSILON})')
  if problems:
    raise JaxgptError(f'this {kind} model differs from what jaxgpt computes: {"; ".join(problems)}.')
  return fields


def architecture(model_cfg) -> str:
  """'gpt2' or 'llama': the HF format a jaxgpt model exports to, or a JaxgptError."""
  m = model_cfg
  if (m.position, m.norm, m.mlp, m.use_bias, m.tie_embeddings) == ('learned', 'layernorm', 'gelu', True, True):
    return 'gpt2'
  if (m.position, m.norm, m.mlp, m.use_bias) == ('rope', 'rmsnorm', 'swiglu', False):
    return 'llama'
  raise JaxgptError('only GPT-2 (learned positions, LayerNorm, GELU, biases, tied output) and Llama '
                    '(RoPE, RMSNorm, SwiGLU, no biases) models have a Hugging Face format.')


def hf_config(model_cfg, vocab_size: int, eos_id: int) -> dict:
  m = model_cfg
  if architecture(m) == 'gpt2':
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': vocab_size,
            'n_positions': m.max_len, 'n_embd': m.embed_dim, 'n_layer': m.num_layers, 'n_head': m.num_heads,
            'n_inner': m.mlp_dim, 'activation_function': 'gelu_new', 'layer_norm_epsilon': _NORM_EPSILON,
            'resid_pdrop': m.dropout_rate, 'embd_pdrop': m.dropout_rate, 'attn_pdrop': 0.0,
            'bos_token_id': eos_id, 'eos_token_id': eos_id, 'tie_word_embeddings': True, 'torch_dtype': 'float32'}
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab_size,
          'max_position_embeddings': m.max_len, 'hidden_size': m.embed_dim, 'num_hidden_layers': m.num_layers,
          'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads or m.num_heads,
          'intermediate_size': m.mlp_dim, 'hidden_act': 'silu', 'rms_norm_eps': _NORM_EPSILON,
          'rope_theta': m.rope_theta, 'attention_bias': False, 'mlp_bias': False,
          'tie_word_embeddings': m.tie_embeddings, 'bos_token_id': eos_id, 'eos_token_id': eos_id,
          'torch_dtype': 'float32'}


# --- weights: HF tensors <-> jaxgpt params, one layer at a time ----------------------------------
# HF GPT-2 uses Conv1D, whose weight is [in, out]; HF Llama uses nn.Linear, [out, in].

def _gpt2_layer_from_hf(w: dict, H: int) -> dict:
  D = w['ln_1.weight'].shape[0]
  q, k, v = np.split(w['attn.c_attn.weight'], 3, axis=1)
  qb, kb, vb = np.split(w['attn.c_attn.bias'], 3)
  heads = lambda x: x.reshape(*x.shape[:-1], H, D // H)
  return {'ln_attn': {'scale': w['ln_1.weight'], 'bias': w['ln_1.bias']},
          'query': heads(q), 'key': heads(k), 'value': heads(v),
          'query_bias': heads(qb), 'key_bias': heads(kb), 'value_bias': heads(vb),
          'out': w['attn.c_proj.weight'].reshape(H, D // H, D), 'out_bias': w['attn.c_proj.bias'],
          'ln_mlp': {'scale': w['ln_2.weight'], 'bias': w['ln_2.bias']},
          'mlp_up': w['mlp.c_fc.weight'], 'mlp_up_bias': w['mlp.c_fc.bias'],
          'mlp_down': w['mlp.c_proj.weight'], 'mlp_down_bias': w['mlp.c_proj.bias']}


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


def _llama_layer_from_hf(w: dict, H: int) -> dict:
  D = w['input_layernorm.weight'].shape[0]
  K = D // H
  heads = lambda x: x.T.reshape(D, -1, K)
  return {'ln_attn': {'scale': w['input_layernorm.weight']},
          'query': heads(w['self_attn.q_proj.weight']), 'key': heads(w['self_attn.k_proj.weight']),
          'value': heads(w['self_attn.v_proj.weight']), 'out': w['self_attn.o_proj.weight'].T.reshape(H, K, D),
          'ln_mlp': {'scale': w['post_attention_layernorm.weight']},
          'mlp_gate': w['mlp.gate_proj.weight'].T, 'mlp_up': w['mlp.up_proj.weight'].T,
          'mlp_down': w['mlp.down_proj.weight'].T}


def _llama_layer_to_hf(p: dict) -> dict:
  D = p['query'].shape[0]
  linear = lambda x: x.reshape(D, -1).T
  return {'input_layernorm.weight': p['ln_attn']['scale'],
          'self_attn.q_proj.weight': linear(p['query']), 'self_attn.k_proj.weight': linear(p['key']),
          'self_attn.v_proj.weight': linear(p['value']), 'self_attn.o_proj.weight': p['out'].reshape(-1, D).T,
          'post_attention_layernorm.weight': p['ln_mlp']['scale'],
          'mlp.gate_proj.weight': p['mlp_gate'].T, 'mlp.up_proj.weight': p['mlp_up'].T,
          'mlp.down_proj.weight': p['mlp_down'].T}


# Per architecture: where the layers and the other tensors live in HF names.
_LAYOUT = {
    'gpt2': {'layer': 'h.{i}.', 'from_hf': _gpt2_layer_from_hf, 'to_hf': _gpt2_layer_to_hf,
             'token_embedding': 'wte.weight', 'position_embedding': 'wpe.weight',
             'ln_final': {'scale': 'ln_f.weight', 'bias': 'ln_f.bias'}, 'prefix': 'transformer.'},
    'llama': {'layer': 'model.layers.{i}.', 'from_hf': _llama_layer_from_hf, 'to_hf': _llama_layer_to_hf,
              'token_embedding': 'model.embed_tokens.weight', 'ln_final': {'scale': 'model.norm.weight'},
              'prefix': ''},
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
  # GPT-2 checkpoints name tensors with or without the 'transformer.' prefix (GPT2Model vs LMHead).
  tensors = {n.removeprefix(layout['prefix']): t for n, t in tensors.items()}

  def take(name):
    if name not in tensors:
      raise JaxgptError(f'the Hugging Face checkpoint has no tensor {name!r}: it is not a complete {kind} model.')
    return tensors[name]

  layers = []
  for i in range(fields['num_layers']):
    prefix = layout['layer'].format(i=i)
    layers.append(layout['from_hf']({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)},
                                    fields['num_heads']))
  params = {'token_embedding': take(layout['token_embedding']),
            'blocks': jax.tree.map(lambda *xs: np.stack(xs), *layers),
            'ln_final': {k: take(v) for k, v in layout['ln_final'].items()}}
  if 'position_embedding' in layout:
    params['position_embedding'] = take(layout['position_embedding'])
  if not fields['tie_embeddings']:
    params['output'] = take('lm_head.weight').T
  return params


def params_to_hf(params: dict, kind: str) -> dict[str, np.ndarray]:
  layout = _LAYOUT[kind]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), stacked(params))
  tensors = {layout['prefix'] + layout['token_embedding']: params['token_embedding']}
  if 'position_embedding' in layout:
    tensors[layout['prefix'] + layout['position_embedding']] = params['position_embedding']
  for k, name in layout['ln_final'].items():
    tensors[layout['prefix'] + name] = params['ln_final'][k]
  num_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  for i in range(num_layers):
    layer = layout['to_hf'](jax.tree.map(lambda x: x[i], params['blocks']))
    tensors.update({layout['prefix'] + layout['layer'].format(i=i) + n: t for n, t in layer.items()})
  if 'output' in params:
    tensors['lm_head.weight'] = params['output'].T
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


# --- whole checkpoints ---------------------------------------------------------------------------

def load_hf(directory: str):
  """(model fields, tokenizer, params) from a Hugging Face directory."""
  directory = paths.expand(directory)
  config_path = paths.path(directory) / HF_CONFIG
  if not config_path.exists() or not is_hf_directory(directory):
    raise JaxgptError(f'{directory} is not a Hugging Face model directory (it needs {HF_CONFIG} and '
                      f'{HF_WEIGHTS}). Download one with `huggingface-cli download gpt2 --local-dir DIR`.')
  hf = json.loads(config_path.read_text())
  fields = model_fields(hf)
  tokenizer = load_byte_level_bpe(tokenizer_path(directory), _eos_token(directory))
  if tokenizer.vocab_size != hf['vocab_size']:
    raise JaxgptError(f'the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model '
                      f'{hf["vocab_size"]} embeddings; jaxgpt needs them equal.')
  return fields, tokenizer, params_from_hf(read_safetensors(directory), fields, hf['model_type'])


def tokenizer_path(directory: str) -> str:
  """tokenizer.json when the directory has one (it holds the exact pre-tokenizer), else the directory
  (vocab.json + merges.txt)."""
  tokenizer_json = paths.path(directory) / 'tokenizer.json'
  return str(tokenizer_json) if tokenizer_json.exists() else directory


def _eos_token(directory: str) -> str:
  """The end-of-text token: tokenizer_config.json's, else GPT-2's."""
  path = paths.path(directory) / 'tokenizer_config.json'
  if path.exists():
    eos = json.loads(path.read_text()).get('eos_token')
    if eos:
      return eos['content'] if isinstance(eos, dict) else eos
  return '<|endoftext|>'
