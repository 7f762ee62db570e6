"""Hugging Face GPT-2 and Llama in and out: the same logits both ways, identical tensors after a round trip."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import run_module
from hf_models import EOS, hf_logits, require_transformers, save_gpt2, save_llama, save_tokenizer
from jaxgpt import convert, hf, inference, run_dir, state
from jaxgpt.model import build_model
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data.tokenizer import load_byte_level_bpe

IDS = [[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 0, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
# Weights ten times GPT-2's init spread, so that activations are O(1) and a subtly wrong computation (the exact
# GELU for the tanh one: 1e-3 here, 4e-7 at the usual spread) shows above atol=1e-4; float noise is 3e-6.
WIDE = 0.2


def _jaxgpt_logits(workdir):
  config, tokenizer = run_dir.load_run(workdir)
  loaded = inference.load(config, tokenizer, workdir)
  return np.asarray(loaded.model.apply({'params': loaded.params}, jnp.array(IDS)))


@pytest.mark.parametrize('save', [save_gpt2, save_llama], ids=['gpt2', 'llama'])
def test_imported_model_gives_the_logits_of_transformers(tmp_path, save):
  reference = save(str(tmp_path / 'hf'), init_std=WIDE)
  convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  np.testing.assert_allclose(_jaxgpt_logits(str(tmp_path / 'run')), hf_logits(reference, IDS), atol=1e-4, rtol=0)


def test_a_bfloat16_checkpoint_imports(tmp_path):
  """Most published Llama checkpoints store bf16 tensors; they import as exact float32 values."""
  import torch
  directory = str(tmp_path / 'hf')
  model = save_llama(directory, init_std=WIDE).to(torch.bfloat16)
  model.save_pretrained(directory)  # the same weights again, stored as bf16
  assert {str(t.dtype) for t in load_file(os.path.join(directory, 'model.safetensors')).values()} == {'bfloat16'}
  convert.import_hf(directory, str(tmp_path / 'run'))
  # The reference: those bf16 weights in a float32 model (model.float() would keep RoPE's frequencies
  # rounded to bf16 by .to(), 2e-3 off in the logits).
  _, transformers = require_transformers()
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  assert all(p.dtype == torch.float32 for p in reference.parameters())
  np.testing.assert_allclose(_jaxgpt_logits(str(tmp_path / 'run')), hf_logits(reference, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, arch):
  _, transformers = require_transformers()
  save_tokenizer(str(tmp_path / 'tok'))
  tokenizer = load_byte_level_bpe(str(tmp_path / 'tok' / 'tokenizer.json'), EOS)
  config = base_config()
  config.model.update(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=96, max_len=64)
  if arch == 'llama':
    config.model.update(num_kv_heads=2, position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                        tie_embeddings=False)
  model = build_model(config, tokenizer.vocab_size)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params']
  # Random norms and biases, so that a wrong mapping of any tensor changes the logits.
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params,
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(treedef, [x + WIDE * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  state.save_initial_run(config, tokenizer, params, str(tmp_path / 'run'))
  out = convert.export_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'))

  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(exported).__name__ == {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}[arch]
  np.testing.assert_allclose(hf_logits(exported, IDS), _jaxgpt_logits(str(tmp_path / 'run')), atol=1e-4, rtol=0)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  text = 'upper: fox -> FOX' + EOS
  assert hf_tokenizer(text)['input_ids'] == tokenizer.encode(text)
  assert hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_import_then_export_gives_identical_tensors(tmp_path):
  save_gpt2(str(tmp_path / 'hf'))
  convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  convert.export_hf(str(tmp_path / 'run'), str(tmp_path / 'back'))
  original = load_file(str(tmp_path / 'hf' / hf.HF_WEIGHTS))
  back = load_file(str(tmp_path / 'back' / hf.HF_WEIGHTS))
  assert sorted(back) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(back[name], tensor, err_msg=name)


def test_bad_inputs_are_one_line_errors(tmp_path):
  os.makedirs(tmp_path / 'empty')
  result = run_module('jaxgpt.convert', f'--import_hf={tmp_path / "empty"}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2 and 'not a Hugging Face model directory' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  result = run_module('jaxgpt.convert', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2 and 'exactly one of' in result.stderr
  with pytest.raises(JaxgptError, match='GELU'):
    hf.model_fields({'model_type': 'gpt2', 'activation_function': 'relu', 'n_layer': 1, 'n_head': 1,
                     'n_embd': 8, 'n_positions': 8})
