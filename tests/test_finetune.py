"""Fine-tuning: init_from a Hugging Face directory, instruction data with response-only loss masks."""

import itertools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import apply_overrides
from hf_models import save_gpt2
from jaxgpt import inference, run_dir
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import instructions, pipeline
from jaxgpt.data.tokenizer import load_byte_level_bpe
from jaxgpt.sample import Sampling, complete
from jaxgpt.model import build_model, loss_sums
from jaxgpt.train import train
from test_configs import load

LETTERS = 'abcdefgh'
TINY_GPT2 = {'model.num_layers': 2, 'model.num_heads': 2, 'model.embed_dim': 64, 'model.mlp_dim': 256,
             'model.max_len': 64}


def _data_cfg(fmt):
  cfg = base_config().data
  cfg.format = fmt
  return cfg


def test_alpaca_and_chat_records_render_with_marked_responses(tmp_path):
  text, problem = instructions.render({'instruction': 'upper', 'input': 'abc', 'output': 'ABC'}, _data_cfg('alpaca'))
  assert problem == '' and instructions.without_markers(text) == '<|user|>\nupper\n\nabc\n<|assistant|>\nABC<|end|>\n'
  chat = {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'},
                       {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'bye'},
                       {'role': 'assistant', 'content': 'ciao'}]}
  text, _ = instructions.render(chat, _data_cfg('chat'))
  # ShareGPT/Vicuna records ("conversations", "from": human/gpt/system) are the same chat.
  speakers = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}
  sharegpt = {'conversations': [{'from': speakers[m['role']], 'value': m['content']} for m in chat['messages']]}
  assert instructions.render(sharegpt, _data_cfg('chat')) == (text, '')
  assert instructions.render({'conversations': [{'from': 'bot', 'value': 'hi'}]}, _data_cfg('chat')) == (
      None, "ShareGPT speaker 'bot' is not one of system, human, gpt")
  save_gpt2(str(tmp_path / 'hf'))
  tokenizer = load_byte_level_bpe(str(tmp_path / 'hf' / 'tokenizer.json'), '<|endoftext|>')
  [(ids, mask)] = instructions.encode(tokenizer, [text])
  trained = tokenizer.decode(ids[mask == 1])
  assert trained == 'hello<|end|>\nciao<|end|>\n<|endoftext|>'
  # Through packing: a row holding two such conversations trains on their assistant turns alone.
  batch = next(pipeline.make_iterator([{'tokens': ids, 'loss_mask': mask}] * 4, seq_len=2 * len(ids) - 1,
                                      local_batch_size=1, seed=0, shuffle=False, process_index=0, process_count=1))
  assert tokenizer.decode(batch['targets'][0][batch['loss_mask'][0] == 1]) == trained * 2
  # Bits per byte of instruction data: the trained tokens stand for the responses' bytes, and only those.
  assert tokenizer.token_bytes()[ids[mask == 1]].sum() == len('hello<|end|>\nciao<|end|>\n'.encode())
  assert tokenizer.decode(ids[mask == 0]).endswith('<|user|>\nbye\n<|assistant|>\n')
  assert instructions.render({'messages': [{'role': 'user', 'content': 'hi'}]}, _data_cfg('chat')) == (
      None, 'no assistant message')
  assert instructions.render({'instruction': 'x'}, _data_cfg('alpaca')) == (None, "missing field 'output'")


def test_masked_targets_contribute_nothing():
  rng = np.random.default_rng(0)
  docs = []
  for _ in range(12):
    n = int(rng.integers(8, 30))
    mask = np.zeros(n, np.uint8)
    mask[n // 2:] = 1
    docs.append({'tokens': rng.integers(3, 50, n).astype(np.int32), 'loss_mask': mask})
  batch = next(pipeline.make_iterator(docs, seq_len=32, local_batch_size=4, seed=0, shuffle=False,
                                      process_index=0, process_count=1))
  assert 0 < batch['loss_mask'].sum() < 0.7 * batch['loss_mask'].size
  config = apply_overrides(base_config(), TINY_GPT2)
  model = build_model(config, 64)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'],
                        is_leaf=lambda x: hasattr(x, 'unbox'))
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True))
  (loss, count), grads = value_and_grad(params, batch)
  scrambled = dict(batch, targets=np.where(batch['loss_mask'] == 1, batch['targets'],
                                           rng.integers(0, 64, batch['targets'].shape)).astype(np.int32))
  assert (scrambled['targets'] != batch['targets']).sum() > 20
  (loss2, count2), grads2 = value_and_grad(params, scrambled)
  assert float(loss) == float(loss2) and float(count) == float(count2) == batch['loss_mask'].sum()
  jax.tree.map(np.testing.assert_array_equal, grads, grads2)
  # And the other way: a changed response target does change the loss.
  changed = dict(batch, targets=np.where(batch['loss_mask'] == 1, (batch['targets'] + 1) % 64, batch['targets']))
  assert float(value_and_grad(params, changed)[0][0]) != float(loss)


# A terse template keeps the documents short, so that many fit in a row: 'abc=' -> 'ABC.'
TERSE_TEMPLATE = {'data.template.user': '{content}=', 'data.template.assistant': '', 'data.template.end': '.'}


def _accuracy(model, params, tokenizer, words) -> float:
  outputs = complete(model, params, tokenizer, [f'{w}=' for w in words], Sampling(max_new_tokens=4, temperature=0.0))
  return float(np.mean([o.text.startswith(w.upper() + '.') for o, w in zip(outputs, words)]))


def test_instruction_tuning_learns_upper_casing(tmp_path, data_cache):
  """A random byte-level GPT-2 learns to upper-case unseen 3-letter words from 500 examples."""
  save_gpt2(str(tmp_path / 'hf'), width=64, heads=2, positions=64, vocab_size=257)
  words = [''.join(p) for p in itertools.product(LETTERS, repeat=3)]
  random.Random(0).shuffle(words)
  held_out, seen = words[:40], words[40:]
  with open(tmp_path / 'train.jsonl', 'w') as f:
    f.writelines(json.dumps({'instruction': w, 'output': w.upper()}) + '\n' for w in seen)
  config = apply_overrides(load('sft_alpaca', 'small'), {
      **TINY_GPT2, 'seq_len': 64, 'batch_size': 16, 'init_from': str(tmp_path / 'hf'),
      'data.path': str(tmp_path / 'train.jsonl'), 'data.cache_dir': data_cache, 'data.num_workers': 1,
      **TERSE_TEMPLATE, 'optim.lr': 3e-3, 'optim.warmup_steps': 20,
      'optim.weight_decay': 0.0, 'train.num_steps': 200, 'train.eval_every': 200, 'train.eval_batches': 2,
      'train.checkpoint_every': 200, 'train.log_every': 100, 'train.peak_flops_per_device': 1e11,
      'sample.prompts': ()})
  base = inference.load_base(config)
  model = build_model(config, base.tokenizer.vocab_size)
  before = _accuracy(model, base.params, base.tokenizer, held_out)
  train(config, str(tmp_path / 'run'))
  run_config, tokenizer = run_dir.load_run(str(tmp_path / 'run'))
  assert tokenizer.fingerprint == base.tokenizer.fingerprint
  loaded = inference.load(run_config, tokenizer, str(tmp_path / 'run'))
  after = _accuracy(loaded.model, loaded.params, tokenizer, held_out)
  print(f'exact match on 40 unseen words: {before:.2f} before, {after:.2f} after fine-tuning')
  assert before <= 0.05 and after >= 0.8


def test_init_from_refuses_another_shape_or_tokenizer(tmp_path):
  save_gpt2(str(tmp_path / 'hf'))
  config = apply_overrides(base_config(), {'init_from': str(tmp_path / 'hf'), 'model.num_layers': 2,
                                           'model.num_heads': 2, 'model.embed_dim': 48, 'model.max_len': 64})
  with pytest.raises(JaxgptError, match='embed_dim: base 32, config 48'):
    inference.load_base(config)
  config.model.update(embed_dim=32, mlp_dim=128)
  save_gpt2(str(tmp_path / 'other'), vocab_size=300)
  config.data.tokenizer.update(kind='byte_bpe', path=str(tmp_path / 'other' / 'tokenizer.json'))
  with pytest.raises(JaxgptError, match='use the same tokenizer as your base model'):
    inference.load_base(config)


# docs/finetuning.md's commands (import, fine-tune, export, then load in transformers with the same logits)
# run as written in tests/test_docs.py and tests/test_end_to_end.py.
