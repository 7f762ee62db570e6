"""Today's base models in and out: Llama 3, Mistral, Qwen2, GPT-J and GPT-NeoX.

Each is a tiny random transformers model made here: imported, it gives transformers' logits; exported, it
loads back in transformers with the same logits and the tensors it came with; and greedy decoding through
the KV cache (unrolled layers) agrees with the argmax of full forward passes (scanned layers).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from safetensors.numpy import load_file

from hf_models import hf_logits, require_transformers, save_llama, save_model
from jaxgpt import hf, inference, sample
from jaxgpt.checkpoint import STATED_SHAPE_FIELDS
from jaxgpt.config import JaxgptError, base_config, validate
from jaxgpt.model import GPT, ModelConfig

IDS = [[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 0, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
# Weights ten times the usual init spread: activations O(1), so that a subtly wrong computation shows above 1e-4.
WIDE = 0.2
# Each family's transformers config (tiny: 2 layers, 64 wide, 4 heads of 16), the field its import must set, and
# that field's plain value, which must change the logits: the feature is exercised, not just carried along.
_LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    # rope_theta and scaling as Llama 3.1's but a pretraining length of 16, so that a 12-token input reaches
    # the stretched and the interpolated frequencies; tied embeddings as Llama 3.2 1B/3B.
    'llama3': ('LlamaConfig', dict(**_LLAMA_SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                                   rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                                 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}),
               {'rope_scaling': 'llama3'}, {'rope_scaling': 'none'}),
    'mistral': ('MistralConfig', dict(**_LLAMA_SHAPE, sliding_window=4, rope_theta=1e6, rms_norm_eps=1e-5),
                {'sliding_window': 4}, {'sliding_window': 0}),
    'qwen2': ('Qwen2Config', dict(**_LLAMA_SHAPE, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
              {'qkv_bias': True, 'norm_epsilon': 1e-6}, None),
    'gptj': ('GPTJConfig', dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, rotary_dim=8, n_positions=64),
             {'rotary_dim': 8, 'rope_interleaved': True, 'parallel_residual': True, 'shared_norm': True,
              'output_bias': True}, {'rope_interleaved': False}),
    # Pythia-style: exact GELU, a quarter... here half of each head rotated, parallel blocks, embeddings padded.
    'gpt_neox': ('GPTNeoXConfig', dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5,
                                       hidden_act='gelu', use_parallel_residual=True),
                 {'rotary_dim': 8, 'mlp': 'gelu_exact', 'parallel_residual': True, 'shared_norm': False},
                 {'parallel_residual': False}),
}
# Decoded through the KV cache too: Llama 3's scaling with a sliding window (to cover both: jaxgpt's
# cache against its own full forward passes), and NeoX's partial RoPE and parallel blocks.
DECODED = {'llama3': {'sliding_window': 4}, 'gpt_neox': {}}
PADDING = {'gpt_neox': 8}


def _forward(fields: dict, vocab: int):
  """The model's logits for a batch shaped like IDS: compiled once, then fast for every call."""
  model = GPT(ModelConfig(vocab_size=vocab, **fields))
  forward = jax.jit(lambda params, ids: model.apply({'params': params}, ids))
  return lambda params, ids=IDS: np.asarray(forward(params, jnp.array(ids)))


@pytest.mark.parametrize('family', FAMILIES)
def test_base_model_imports_exports_and_decodes_as_transformers(tmp_path, family):
  _, transformers = require_transformers()
  config_class, hf_settings, imported, plain = FAMILIES[family]
  config = getattr(transformers, config_class)(**hf_settings, initializer_range=WIDE, bos_token_id=0, eos_token_id=0)
  source = str(tmp_path / 'hf')
  reference = save_model(source, config, vocab_padding=PADDING.get(family, 0))

  fields, tokenizer, params = hf.load_hf(source)
  assert {k: fields[k] for k in imported} == imported
  run_config = base_config()  # the fields are config.model's, and a valid config
  run_config.model.update(fields)
  run_config.update(seq_len=64, sample=dict(max_new_tokens=8))
  validate(run_config)
  # Fine-tuning it (init_from): the config states the sizes, and the rest of the architecture is the base's.
  tuning = base_config()
  tuning.model.update({k: fields[k] for k in (*STATED_SHAPE_FIELDS, 'rope_theta')})
  tuning.init_from = source
  inference.load_base(tuning)
  assert {k: tuning.model[k] for k in hf.IMPORTED_FIELDS} == {k: fields[k] for k in hf.IMPORTED_FIELDS}
  vocab = tokenizer.vocab_size
  logits = _forward(fields, vocab)(params)
  expected = hf_logits(reference, IDS)
  assert expected.shape[-1] == vocab + PADDING.get(family, 0)
  np.testing.assert_allclose(logits, expected[..., :vocab], atol=1e-4, rtol=0)
  if plain:
    assert np.abs(_forward({**fields, **plain}, vocab)(params) - logits).max() > 1e-2
  if fields['output_bias']:  # the chunked loss's (hidden states, projection) carry the bias as a last row
    hidden, head = GPT(ModelConfig(vocab_size=vocab, **fields)).apply({'params': params}, jnp.array(IDS),
                                                                      return_hidden=True)
    np.testing.assert_allclose((hidden @ head).reshape(logits.shape), logits, atol=1e-5, rtol=0)
  if family == 'mistral':  # packed rows take the window in their dense mask: each document as if alone
    packed = GPT(ModelConfig(vocab_size=vocab, **fields)).apply(
        {'params': params}, jnp.array([IDS[0][:6] + IDS[1][:6]]), jnp.array([[1] * 6 + [2] * 6]),
        jnp.array([list(range(6)) * 2]))
    np.testing.assert_allclose(packed[0], np.concatenate([logits[0, :6], logits[1, :6]]), atol=1e-5, rtol=0)

  # Export: what transformers loads gives the same logits, and every tensor is the one imported.
  kind = hf.architecture(fields)
  assert kind == (family if family != 'llama3' else 'llama')
  out = tmp_path / 'export'
  out.mkdir()
  (out / hf.HF_WEIGHTS).write_bytes(safetensors.numpy.save(hf.params_to_hf(params, kind), metadata={'format': 'pt'}))
  (out / hf.HF_CONFIG).write_text(json.dumps(hf.hf_config(fields, vocab, eos_id=0)))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation='eager').eval()
  assert type(exported).__name__ == type(reference).__name__
  np.testing.assert_allclose(hf_logits(exported, IDS), logits, atol=1e-4, rtol=0)
  original, back = load_file(os.path.join(source, hf.HF_WEIGHTS)), load_file(str(out / hf.HF_WEIGHTS))
  assert sorted(back) == sorted(original)
  for name, tensor in back.items():  # padded embedding rows are not exported
    np.testing.assert_array_equal(tensor, original[name][:tensor.shape[0]], err_msg=name)

  if family in DECODED:
    fields = {**fields, **DECODED[family]}
    prompt, new = IDS[0][:4], 6  # to position 9: past a window of 4
    decoded = sample.generate(GPT(ModelConfig(vocab_size=vocab, **fields)), params, [prompt],
                              sample.Sampling(max_new_tokens=new), eos_id=vocab)[0]
    forward, rows, tokens = _forward(fields, vocab), np.array(IDS), list(prompt)
    for _ in range(new):  # row 0 holds the tokens so far, then old ones that causal attention never reads
      rows[0, :len(tokens)] = tokens
      tokens.append(int(forward(params, rows)[0, len(tokens) - 1].argmax()))
    assert decoded.tokens == tokens[len(prompt):]


def test_what_jaxgpt_cannot_compute_is_refused_with_the_reason(tmp_path):
  llama = dict(model_type='llama', hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
               max_position_embeddings=64)
  with pytest.raises(JaxgptError, match="RoPE scaling 'yarn'"):
    hf.model_fields({**llama, 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}})
  with pytest.raises(JaxgptError, match='sliding window in some layers only'):
    hf.model_fields({**llama, 'model_type': 'qwen2', 'use_sliding_window': True, 'sliding_window': 8,
                     'max_window_layers': 1})
  with pytest.raises(JaxgptError, match="cannot convert a Hugging Face 'bert' model: jaxgpt reads gpt2, llama"):
    hf.model_fields({'model_type': 'bert'})
  # Qwen2's window is off unless use_sliding_window; Mistral's is every layer's.
  assert hf.model_fields({**llama, 'model_type': 'qwen2', 'sliding_window': 8})['sliding_window'] == 0
  assert hf.model_fields({**llama, 'model_type': 'mistral', 'sliding_window': 8})['sliding_window'] == 8

  neox = hf.model_fields({'model_type': 'gpt_neox', 'hidden_size': 64, 'num_attention_heads': 4,
                          'num_hidden_layers': 2, 'intermediate_size': 128, 'max_position_embeddings': 64})
  with pytest.raises(JaxgptError, match="nearest, GPTNeoXForCausalLM, needs shared_norm False"):
    hf.architecture(ModelConfig(vocab_size=8, **{**neox, 'shared_norm': True}))
  config = base_config()
  config.model.update(position='rope', rotary_dim=7, shared_norm=True, rope_scaling='llama3',
                      rope_low_freq_factor=4.0)
  with pytest.raises(JaxgptError, match='rotary_dim=7 must be even.*low_freq_factor < rope_high.*'
                                        'shared_norm=True .* needs model.parallel_residual=True'):
    validate(config)

  # Weights that are not the config's: named, not a reshape error from deep inside.
  directory = tmp_path / 'hf'
  save_llama(str(directory))
  hf_config = json.loads((directory / hf.HF_CONFIG).read_text())
  (directory / hf.HF_CONFIG).write_text(json.dumps({**hf_config, 'num_key_value_heads': 4}))
  with pytest.raises(JaxgptError, match=r"do not fit .*\['blocks'\]\['key'\]: \(2, 32, 2, 8\) for \(2, 32, 4, 8\)"):
    hf.load_hf(str(directory))
  # Llama 3 Instruct stops at several tokens: generation_config.json's list wins over config.json's one, and the
  # tokenizer's EOS (here id 0) must be one of them.
  (directory / hf.HF_CONFIG).write_text(json.dumps(hf_config))
  (directory / hf.HF_GENERATION_CONFIG).write_text(json.dumps({'eos_token_id': [5, 0]}))
  assert hf.eos_ids(str(directory)) == (5, 0)
  hf.load_hf(str(directory))
  (directory / hf.HF_GENERATION_CONFIG).write_text(json.dumps({'eos_token_id': [5, 6]}))
  with pytest.raises(JaxgptError, match=r"ends text with '<\|endoftext\|>' \(id 0\) and the model with ids \[5, 6\]"):
    hf.load_hf(str(directory))
