"""Weighted data mixtures (data.mixture): shared tokenizer, per-source caches, row mixing by weight, accounting.

Three JSONL sources, each written in its own alphabet, so that every packed
row can be told apart by its text alone, whatever the pipeline says.
"""

import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm

from conftest import TINY_OVERRIDES, apply_overrides
from configs import quickstart
from jaxgpt.config import JaxgptError, mixture_parts, validate
from jaxgpt.data import builder, corpus, mixture, pipeline

ALPHABETS = {'web': 'abcdefgh', 'code': 'ijklmnop', 'books': 'QRSTUVWXYZ'}
WEIGHTS = {'web': 0.7, 'code': 0.2, 'books': 0.1}
SEQ_LEN, ROWS = TINY_OVERRIDES['seq_len'], TINY_OVERRIDES['batch_size']  # the shapes other tests compile


def _write_source(path: str, alphabet: str, seed: int) -> None:
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(60):
      words = [''.join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(20, 80))]
      f.write(json.dumps({'id': f'{seed}-{i}', 'text': ' '.join(words)}) + '\n')


@pytest.fixture(scope='module')
def mixture_config(tmp_path_factory):
  """The tiny config, reading a 0.7 / 0.2 / 0.1 mixture of the three sources (web with its own cleaning)."""
  root = tmp_path_factory.mktemp('mixture')
  config = apply_overrides(quickstart.get_config(), {**TINY_OVERRIDES, 'seq_len': SEQ_LEN, 'batch_size': ROWS})
  config.data.update(cache_dir=str(root / 'cache'), vocab_size=512, num_workers=1, val_fraction=0.2)
  for seed, (name, alphabet) in enumerate(ALPHABETS.items()):
    _write_source(str(root / f'{name}.jsonl'), alphabet, seed)
    config.data.mixture[name] = {'weight': WEIGHTS[name], 'source': 'jsonl', 'path': str(root / f'{name}.jsonl')}
  config.data.mixture.web.clean = {'near_dedup': False}  # a source's own cleaning setting
  return config


@pytest.fixture(scope='module')
def prepared(mixture_config):
  return builder.prepare(mixture_config.data, log=lambda m: None)


def _source_of(text: str) -> str:
  """The source whose alphabet holds every character of `text` (besides spaces)."""
  found = [name for name, alphabet in ALPHABETS.items() if set(text) - {' '} <= set(alphabet)]
  assert len(found) == 1, f'row text {text!r} is not from exactly one source'
  return found[0]


def test_each_source_is_cached_on_its_own_with_one_shared_tokenizer(mixture_config, prepared):
  assert set(prepared.parts) == set(WEIGHTS)
  assert len({part.directory for part in prepared.parts.values()}) == 3
  assert {part.tokenizer.fingerprint for part in prepared.parts.values()} == {prepared.tokenizer.fingerprint}
  parts = mixture_parts(mixture_config.data)  # each source's settings: data.* with its entry's over them
  assert not parts['web'][1].clean.near_dedup and parts['code'][1].clean.near_dedup
  assert parts['books'][1].path.endswith('books.jsonl') and parts['books'][0] == 0.1
  assert prepared.weights == pytest.approx(WEIGHTS)
  # Trained on every source's text: each alphabet has merged pieces, and no character falls back to bytes.
  tokenizer = prepared.tokenizer
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.serialized)
  pieces = [sp.id_to_piece(i).replace('\u2581', ' ').strip() for i in range(sp.get_piece_size()) if not sp.is_byte(i)]
  for alphabet in ALPHABETS.values():
    assert any(len(piece) >= 2 and set(piece) <= set(alphabet) for piece in pieces), alphabet
    ids = tokenizer.encode(' '.join(alphabet))
    assert tokenizer.decode(ids) == ' '.join(alphabet) and not any(map(sp.is_byte, ids)), alphabet
  report = prepared.report
  assert report['train']['tokens'] == sum(p.report['train']['tokens'] for p in prepared.parts.values())
  assert report['mixture']['web']['weight'] == pytest.approx(0.7)
  again = builder.prepare(mixture_config.data, log=lambda m: None)
  assert again.reused and again.tokenizer.fingerprint == tokenizer.fingerprint


def _iterator(prepared, seed=0):
  return pipeline.make_iterator(prepared.chunks('train', SEQ_LEN + 1), seq_len=SEQ_LEN, local_batch_size=ROWS,
                                seed=seed, shuffle=True, process_index=0, process_count=1)


def test_realized_token_shares_match_the_weights_within_two_percent(prepared):
  # 2,000 rows: even a mixer drawing each row at random by weight would be within 2% (3 standard deviations of
  # the 0.7 share); equal mixing (a third each) or mixing documents instead of rows would be far outside.
  it = _iterator(prepared)
  counted = dict.fromkeys(WEIGHTS, 0)
  for _ in range(2000 // ROWS):
    batch = next(it)
    assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}  # no source sent onward
    for row in batch['inputs']:
      counted[_source_of(prepared.tokenizer.decode(row.tolist()))] += len(row)
  total = sum(counted.values())
  for name, weight in WEIGHTS.items():
    assert abs(counted[name] / total - weight) < 0.02, (name, counted)
  assert it.source_tokens == counted  # the pipeline's own count is what the rows show
  shares = mixture.token_shares(it.source_tokens, prepared.weights, process_count=2)
  assert shares['web']['tokens'] == 2 * counted['web'] and shares['web']['share'] == counted['web'] / total
  assert 'web 70.0% (weight 70.0%)' in mixture.shares_line(shares)


def test_restored_mixed_iterator_continues_exactly(prepared):
  it = _iterator(prepared, seed=3)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  restored = _iterator(prepared, seed=3)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  assert restored.source_tokens == it.source_tokens and sum(it.source_tokens.values()) == 12 * ROWS * SEQ_LEN


def test_weighted_sample_gives_each_source_its_share_of_bytes(tmp_path):
  directories = {}
  for name, alphabet in ALPHABETS.items():
    directories[name] = str(tmp_path / name)
    os.makedirs(directories[name])
    with open(corpus.clean_file(directories[name], 'train'), 'w') as f:
      f.writelines(json.dumps({'text': (alphabet * 20)[:100]}) + '\n' for _ in range(100))  # as much text in each
  taken = dict.fromkeys(ALPHABETS, 0)
  for text in mixture.weighted_sample(directories, WEIGHTS):
    taken[_source_of(text)] += len(text)
  assert taken['web'] == 100 * 100  # the scarcest for its weight is read whole
  for name, weight in WEIGHTS.items():
    assert abs(taken[name] / sum(taken.values()) - weight) < 0.01, taken


@pytest.mark.parametrize('entry,message', [
    ({'weight': 0}, 'data.mixture.web.weight=0 must be a positive number'),
    ({'source': 'jsonl', 'path': 'x.jsonl'}, 'data.mixture.web.weight=None must be a positive number'),
    ({'weight': 1, 'pathh': 'x'}, 'data.mixture.web.pathh is not a data field'),
    ({'weight': 1, 'clean': {'min_char': 3}}, 'data.mixture.web.clean.min_char is not a data field'),
    ({'weight': 1, 'vocab_size': 100}, 'data.mixture.web sets vocab_size, which one mixture shares'),
    ({'weight': 1, 'source': 'dir'}, 'data.mixture.web.source=\'dir\' needs data.mixture.web.path'),
])
def test_a_bad_mixture_entry_is_one_clear_error(tiny_config, entry, message):
  tiny_config.data.mixture.web = entry
  with pytest.raises(JaxgptError, match=message.replace('(', r'\(').replace('.', r'\.')):
    validate(tiny_config)


def test_training_logs_and_reports_each_sources_share(mixture_config, prepared, tmp_path, capsys):
  from jaxgpt.train import train
  config = mixture_config
  config.train.update(num_steps=10, log_every=5, eval_every=10, checkpoint_every=10, eval_batches=1)
  config.sample.prompts = ()
  results = train(config, str(tmp_path / 'run'))
  log = capsys.readouterr().out
  assert 'step 10: tokens trained on by source: books 10.0% (weight 10.0%) | code 20.0% (weight 20.0%) | ' \
         f'web 70.0% (weight 70.0%) of {10 * ROWS * SEQ_LEN:,}' in log, log
  assert 'step 10: validation loss by source: books ' in log
  saved = json.load(open(tmp_path / 'run' / 'results.json'))
  assert saved['mixture'] == results['mixture']
  for name, weight in WEIGHTS.items():
    entry = saved['mixture'][name]
    assert abs(entry['share'] - weight) < 0.02 and entry['weight'] == pytest.approx(weight)
    assert np.isfinite(entry['validation']['loss']) and entry['validation']['tokens'] > 0
  assert sum(e['tokens'] for e in saved['mixture'].values()) == 10 * ROWS * SEQ_LEN
  # Resumed from the step-10 checkpoint, the counts go on from the saved ones.
  config.train.num_steps = 12
  resumed = train(config, str(tmp_path / 'run'))
  assert sum(e['tokens'] for e in resumed['mixture'].values()) == 12 * ROWS * SEQ_LEN


def test_the_mixture_config_validates_with_its_sources_own_settings():
  from configs import mixture as mixture_config_file
  config = mixture_config_file.get_config()
  validate(config)
  parts = mixture_parts(config.data)
  assert {name: weight for name, (weight, _) in parts.items()} == {'web': 0.7, 'code': 0.2, 'notes': 0.1}
  assert parts['web'][1].clean.unicode_form == 'NFKC' and parts['code'][1].clean.unicode_form == 'NFC'
