"""Preference tuning: pair records, the DPO loss's numbers, and DPO learning a planted preference (full and LoRA)."""

import itertools
import json
import math
import random
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from conftest import apply_overrides
from hf_models import save_tokenizer
from jaxgpt import inference, preference, run_dir
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, instructions, preference as preference_data
from jaxgpt.data.tokenizer import load_byte_level_bpe
from jaxgpt.model import build_model, loss_sums
from jaxgpt.train import train
from test_configs import load

START, END = instructions.RESPONSE_START, instructions.RESPONSE_END


def _data_cfg():
  cfg = base_config().data
  cfg.format = 'preference'
  return cfg


def test_pair_records_render_tokenize_and_fit_rows(tmp_path):
  cfg = _data_cfg()
  plain = {'prompt': 'Name a colour.', 'chosen': 'Blue.', 'rejected': 'No.'}
  text, problem = instructions.render(plain, cfg)
  assert problem == '' and text == (
      f'<|user|>\nName a colour.\n<|assistant|>\n{START}Blue.<|end|>\n{END}{START}No.<|end|>\n{END}')
  # The chat forms give the same text: a prompt as a message list, or `messages` (also ShareGPT's
  # `conversations`) with chosen and rejected as assistant messages (or a list of one).
  as_chat = {'prompt': [{'role': 'user', 'content': 'Name a colour.'}],
             'chosen': [{'role': 'assistant', 'content': 'Blue.'}], 'rejected': {'role': 'assistant', 'content': 'No.'}}
  as_sharegpt = {'conversations': [{'from': 'human', 'value': 'Name a colour.'}],
                 'chosen': {'from': 'gpt', 'value': 'Blue.'}, 'rejected': 'No.'}
  assert instructions.render(as_chat, cfg) == instructions.render(as_sharegpt, cfg) == (text, '')
  # Earlier assistant turns of a chat prompt are context: unmarked, never trained on.
  turns = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'},
           {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'colour?'}]
  text2, _ = instructions.render({'messages': turns, 'chosen': 'Blue.', 'rejected': 'No.'}, cfg)
  assert text2.startswith('<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello<|end|>\n<|user|>\ncolour?\n')
  assert text2.count(START) == 2
  for record, reason in (({'prompt': 'x', 'chosen': 'a'}, "missing field 'rejected'"),
                         ({'prompt': 'x', 'chosen': 'a', 'rejected': 'a'}, 'chosen and rejected are the same'),
                         ({'chosen': 'a', 'rejected': 'b'}, "missing field 'prompt'"),
                         ({'prompt': turns[:3], 'chosen': 'a', 'rejected': 'b'},
                          'the prompt ends with an assistant message'),
                         ({'prompt': 'x', 'chosen': {'role': 'user', 'content': 'a'}, 'rejected': 'b'},
                          "field 'chosen' is not an assistant message")):
    assert instructions.render(record, cfg) == (None, reason)

  save_tokenizer(str(tmp_path))
  tokenizer = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|endoftext|>')
  [pair] = preference_data.encode_pairs(tokenizer, [text2])
  prompt_len, chosen_len, rejected_len = preference_data.lengths(pair)
  # Both sequences hold the same prompt tokens, then their own response, end marker and EOS, all scored.
  np.testing.assert_array_equal(pair['chosen'][:prompt_len], pair['rejected'][:prompt_len])
  for name, response in (('chosen', 'Blue.'), ('rejected', 'No.')):
    ids, mask = pair[name], pair[f'{name}_mask']
    assert not mask[:prompt_len].any() and mask[prompt_len:].all()
    assert tokenizer.decode(ids[prompt_len:]) == f'{response}<|end|>\n<|endoftext|>'

  def rows(seq_len):
    return preference_data.PairRows([pair], np.array([[prompt_len, chosen_len, rejected_len]]), seq_len)

  seq_len = chosen_len - 1  # rows of seq_len + 1 tokens: the longer sequence exactly
  fitting = rows(seq_len)
  assert (len(fitting), fitting.truncated, fitting.dropped) == (1, 0, 0)
  row = fitting[0]
  assert {k: v.shape for k, v in row.items()} == {k: (2, seq_len) for k in
                                                  ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')}
  assert rejected_len < chosen_len  # so the rejected row ends in padding, which nothing scores
  for i, (name, length) in enumerate((('chosen', chosen_len), ('rejected', rejected_len))):
    np.testing.assert_array_equal(row['targets'][i][:length - 1], pair[name][1:])
    assert row['loss_mask'][i].sum() == length - prompt_len and row['segment_ids'][i].sum() == min(length, seq_len)
  # Four tokens too long: the prompt loses its first four in both rows, the responses stay whole.
  cut = rows(seq_len - 4)
  assert (len(cut), cut.truncated, cut.dropped) == (1, 1, 0)
  np.testing.assert_array_equal(cut[0]['inputs'][:, :prompt_len - 4], [pair['chosen'][4:prompt_len]] * 2)
  assert cut[0]['loss_mask'].sum() == row['loss_mask'].sum()
  # Rows that hold the responses after one prompt token (BOS cut too) are the shortest kept; shorter ones are
  # left out, and counted.
  shortest = rows(chosen_len - prompt_len)
  assert (len(shortest), shortest.truncated, shortest.dropped) == (1, 1, 0)
  assert shortest[0]['loss_mask'][0].sum() == chosen_len - prompt_len
  too_short = rows(chosen_len - prompt_len - 1)
  assert (len(too_short), too_short.truncated, too_short.dropped) == (0, 0, 1)

  # Training reads pairs in batches, shuffled, and resumes from a saved position exactly.
  texts = [instructions.render({'prompt': f'Say {i}.', 'chosen': f'{i}', 'rejected': f'{i + 1}'}, cfg)[0]
           for i in range(7)]
  pairs = preference_data.encode_pairs(tokenizer, texts)
  many = preference_data.PairRows(pairs, np.array([preference_data.lengths(p) for p in pairs]), 48)
  batches = lambda: preference_data.make_iterator(many, local_batch_size=3, seed=1, shuffle=True,
                                                  process_index=0, process_count=1)
  first = batches()
  seen = [next(first)['inputs'] for _ in range(3)]
  assert seen[0].shape == (3, 2, 48) and many.truncated == 0
  state = first.get_state()
  later = [next(first)['inputs'] for _ in range(3)]
  resumed = batches()
  resumed.set_state(state)
  for expected in later:
    np.testing.assert_array_equal(next(resumed)['inputs'], expected)
  # Each pair once per pass, in a shuffled order.
  epoch = [re.search(r'Say (\d)', tokenizer.decode(row[0])).group(1) for row in np.concatenate(seen + later)[:7]]
  assert sorted(epoch) == [str(i) for i in range(7)] and epoch != sorted(epoch)


def test_dpo_figures_are_the_formulas_on_log_probs_of_the_shared_loss_path():
  policy = jnp.array([[-3.0, -5.0], [-4.0, -4.0], [-6.0, -2.0]])
  reference = jnp.array([[-4.0, -4.0], [-4.0, -4.0], [-5.0, -3.0]])
  tokens = jnp.array([[2.0, 4.0], [1.0, 1.0], [3.0, 1.0]])
  cfg = ml_collections.ConfigDict({'beta': 0.5, 'label_smoothing': 0.0, 'loss': 'sigmoid'})
  out = jax.tree.map(np.asarray, preference.dpo_loss(policy, reference, tokens, cfg))
  h = np.array([(1 - -1), 0.0, (-1 - 1)])  # chosen's log-ratio minus rejected's
  np.testing.assert_allclose(out['loss'], [math.log1p(math.exp(-0.5 * x)) for x in h], rtol=1e-6)
  np.testing.assert_allclose(out['reward_margin'], 0.5 * h)
  np.testing.assert_array_equal(out['accuracy'], [1.0, 0.5, 0.0])  # a tie is a coin toss
  cfg.label_smoothing = 0.1
  smoothed = np.asarray(preference.dpo_loss(policy, reference, tokens, cfg)['loss'])
  np.testing.assert_allclose(smoothed, [0.9 * math.log1p(math.exp(-0.5 * x)) + 0.1 * math.log1p(math.exp(0.5 * x))
                                        for x in h], rtol=1e-6)
  cfg.update(label_smoothing=0.0, loss='ipo')
  per_token = np.array([(1 / 2 - -1 / 4), 0.0, (-1 / 3 - 1 / 1)])  # IPO: log-ratios per token
  np.testing.assert_allclose(np.asarray(preference.dpo_loss(policy, reference, tokens, cfg)['loss']),
                             (per_token - 1 / (2 * 0.5)) ** 2, rtol=1e-6)

  # Per token, exp(-d) - 1 + d: 0 where the models agree, the tokens off the mask left out.
  d = np.array([0.5, -0.25, 0.0, 7.0])
  mask = np.array([1.0, 1.0, 1.0, 0.0])
  kl = preference.kl_estimate(jnp.asarray([d]), jnp.zeros((1, 4)), jnp.asarray([mask]))
  np.testing.assert_allclose(np.asarray(kl), [np.sum((np.exp(-d) - 1 + d) * mask) / 3], rtol=1e-6)

  # The responses' log-probabilities are the language-model loss's token losses, negated: one path.
  config = apply_overrides(base_config(), {'model.num_layers': 1, 'model.num_heads': 2, 'model.embed_dim': 32,
                                           'model.mlp_dim': 64, 'model.max_len': 16})
  model = build_model(config, 40)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']))()
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 40, (3, 2, 8)), 'targets': rng.integers(0, 40, (3, 2, 8)),
           'segment_ids': np.ones((3, 2, 8), np.int32), 'positions': np.broadcast_to(np.arange(8), (3, 2, 8)),
           'loss_mask': (rng.random((3, 2, 8)) < 0.5).astype(np.int32)}
  log_probs, (loss_sum, _) = jax.jit(lambda p, b: (
      preference.token_log_probs(model, p, b) * b['loss_mask'],
      loss_sums(model, p, jax.tree.map(lambda x: x.reshape(6, 8), b))))(params, batch)
  np.testing.assert_allclose(float(log_probs.sum()), -float(loss_sum), rtol=1e-5)


def test_objective_and_format_must_agree():
  config = base_config()
  config.data.format = 'preference'
  with pytest.raises(JaxgptError, match="set train.objective='dpo'"):
    preference.check_config(config)
  config.train.objective = 'dpo'
  config.dpo.update(beta=0.0, label_smoothing=0.5)
  with pytest.raises(JaxgptError) as error:
    preference.check_config(config)
  assert all(part in str(error.value) for part in ('set init_from', 'dpo.beta=0.0 must be positive',
                                                    'dpo.label_smoothing=0.5 must be in [0, 0.5)'))
  config.data.format = 'chat'
  with pytest.raises(JaxgptError, match="set data.format='preference'"):
    preference.check_config(config)


# A planted preference: the chosen answer to 'abc=' is 'ABC.', the rejected one 'abc.'. Held-out words are unseen.
TERSE_TEMPLATE = {'data.template.user': '{content}=', 'data.template.assistant': '', 'data.template.end': '.'}


def _dpo_config(tmp_path, trained_run, data_cache, **overrides):
  words = [''.join(p) for p in itertools.product('abcdefgh', repeat=3)]
  random.Random(0).shuffle(words)
  path = tmp_path / 'prefs.jsonl'
  with open(path, 'w') as f:
    f.writelines(json.dumps({'id': w, 'prompt': w, 'chosen': w.upper(), 'rejected': w}) + '\n' for w in words[:300])
  config = load('dpo', 'small')
  config.model = run_dir.load_run(trained_run)[0].model  # the base's shape
  return apply_overrides(config, {
      **TERSE_TEMPLATE, 'init_from': trained_run, 'seq_len': 16, 'batch_size': 16,
      'data.path': str(path), 'data.cache_dir': data_cache, 'data.num_workers': 1, 'data.val_fraction': 0.1,
      'optim.lr': 3e-3, 'optim.warmup_steps': 3, 'train.num_steps': 30, 'train.eval_every': 30,
      'train.checkpoint_every': 30, 'train.log_every': 10, 'train.peak_flops_per_device': 1e11,
      'sample.prompts': (), **overrides})


def _first_step(workdir) -> dict:
  return json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0])


def test_dpo_learns_a_planted_preference(tmp_path, trained_run, data_cache):
  config = _dpo_config(tmp_path, trained_run, data_cache)
  results = train(config, str(tmp_path / 'dpo'))
  # At the first step the policy is its reference: every margin 0, accuracy a coin toss.
  first = _first_step(tmp_path / 'dpo')
  assert abs(first['reward_margin']) < 1e-5 and first['kl'] < 1e-8 and 0.25 <= first['accuracy'] <= 0.75
  print(f"held-out pairs: accuracy {results['accuracy']:.2f}, margin {results['reward_margin']:.3f}, "
        f"KL {results['kl']:.4f}, DPO loss {results['loss']:.3f} (log 2 = 0.693 at the start)")
  assert results['pairs'] >= 20 and results['accuracy'] >= 0.9 and results['reward_margin'] > 0
  assert 0 < results['kl'] < 10 and results['loss'] < math.log(2)
  assert math.isfinite(results['chosen_responses']['loss'])


def test_dpo_with_lora_trains_adapters_against_the_base(tmp_path, trained_run, data_cache):
  # Two epochs of the training split's pairs (not of its tokens): about 34 steps of 16 pairs.
  config = _dpo_config(tmp_path, trained_run, data_cache, **{'lora.rank': 4, 'lora.targets': ('query', 'value'),
                                                              'train.num_epochs': 2.0})
  results = train(config, str(tmp_path / 'dpo'))
  assert results['accuracy'] >= 0.9 and 0 < results['kl'] < 10
  base_tokenizer = run_dir.load_run(trained_run)[1]
  train_pairs = len(builder.prepare(config.data, log=lambda message: None, tokenizer=base_tokenizer).pairs('train', 16))
  assert 250 <= train_pairs <= 300 and results['step'] == math.ceil(2 * train_pairs / 16)
  assert results['epochs'] == pytest.approx(results['step'] * 16 / train_pairs)
  # The base is the reference and stays as it was: loaded merged params differ from it on the adapted
  # kernels alone, every other weight bit for bit the base's.
  run_config, tokenizer = run_dir.load_run(str(tmp_path / 'dpo'))
  flat_params = lambda loaded: traverse_util.flatten_dict(jax.device_get(loaded.params))
  merged = flat_params(inference.load(run_config, tokenizer, str(tmp_path / 'dpo')))
  base = flat_params(inference.load(*run_dir.load_run(trained_run), trained_run))
  for key, value in merged.items():
    assert np.array_equal(value, base[key]) == (key[-1] not in ('query', 'value')), key
