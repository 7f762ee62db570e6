"""The Beam executor against the local one: the same kept documents, split, report and tokens on a planted corpus."""

import json
import os
import random

import pytest

from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, dedup
from jaxgpt.data.clean import minhash

pytest.importorskip('apache_beam', reason="the 'beam' extra is not installed")

MULTI_PROCESS = '--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A JSONL file of 300 distinct documents (seeded made-up words), 7 planted records and 3 bad ones.

  Returns (path, the planted records' texts by name, their line numbers by name).
  """
  rng = random.Random(0)
  vocabulary = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(3, 9))) for _ in range(3000)]
  docs = [' '.join(rng.choices(vocabulary, k=rng.randint(60, 150))) for _ in range(300)]
  lines = [json.dumps({'id': i, 'text': t} if i % 3 == 0 else {'text': t}) for i, t in enumerate(docs)]
  chain = rng.choices(vocabulary, k=220)  # A ~ B ~ C, each 20 words on from the one before: A and C are not alike
  edited = docs[40].split()
  edited[30] = 'edited'
  planted = {
      'copy of 7': {'text': '  ' + docs[7].upper().replace(' ', '\n ')},  # the same up to whitespace and case
      'A': {'text': ' '.join(chain[0:180])},
      'B': {'text': ' '.join(chain[20:200])},
      'near copy of 40': {'text': ' '.join(edited)},  # one word in about a hundred edited
      'copy of 7 again': {'id': 'x', 'text': docs[7]},
      'C': {'text': ' '.join(chain[40:220])},
      'missing field': {'body': docs[0]},
  }
  for offset, record in enumerate(planted.values()):
    lines.insert(50 + 40 * offset, json.dumps(record))
  number = {name: lines.index(json.dumps(record)) + 1 for name, record in planted.items()}
  lines[290:290] = ['{"text": "unterminated', '']  # invalid JSON, a blank line
  path = tmp_path_factory.mktemp('beam') / 'corpus.jsonl'
  path.write_bytes('\n'.join(lines).encode() + b'\n{"text": "caf\xe9"}')  # not UTF-8, and no final newline
  return path, {name: record.get('text') for name, record in planted.items()}, number


def _config(path, cache, **fields):
  data = base_config().data
  data.source, data.path, data.cache_dir = 'jsonl', str(path), str(cache)
  data.vocab_size, data.num_workers, data.val_fraction = 300, 1, 0.1
  data.update(fields)
  return data


def _clean_files(directory):
  return [open(os.path.join(directory, f'clean-{split}.jsonl'), 'rb').read() for split in ('train', 'validation')]


def test_the_planted_chain_is_a_chain(corpus):
  """The premise: A~B and B~C are linked, A and C are not, so first-seen dedup would keep C."""
  _, texts, _ = corpus
  cfg = base_config().data.clean
  a, b, c = (dedup.signature_values(minhash(texts[n], cfg.shingle_size, cfg.num_perm)) for n in 'ABC')
  assert dedup.bucket_links([('A', a), ('B', b)], cfg.near_dedup_threshold) == [('A', 'B')]
  assert dedup.bucket_links([('C', c), ('B', b)], cfg.near_dedup_threshold) == [('B', 'C')]
  assert dedup.bucket_links([('A', a), ('C', c)], cfg.near_dedup_threshold) == []
  bands = dedup.lsh_bands(cfg.near_dedup_threshold, cfg.num_perm)
  keys = {n: set(dedup.band_keys(v, *bands)) for n, v in zip('ABC', (a, b, c))}
  assert keys['A'] & keys['B'] and keys['B'] & keys['C']  # candidates, so the links are found
  assert dedup.keepers([((9, 'A'), (12, 'B')), ((12, 'B'), (20, 'C'))]) == {(12, 'B'): (9, 'A'), (20, 'C'): (9, 'A')}


def test_beam_and_local_prepare_the_same_dataset(corpus, tmp_path):
  path, _, number = corpus
  local = builder.prepare(_config(path, tmp_path / 'local'), log=lambda m: None)
  beam = builder.prepare(_config(path, tmp_path / 'beam', executor='beam', beam_args=MULTI_PROCESS),
                         log=lambda m: None)
  assert _clean_files(beam.directory) == _clean_files(local.directory)  # the same documents, split and order
  assert beam.tokenizer.fingerprint == local.tokenizer.fingerprint
  assert beam.report['speed']['runner'] == 'DirectRunner' and 'runner' not in local.report['speed']
  del local.report['speed'], beam.report['speed']
  assert beam.report == local.report  # every count and example, and the documents, bytes and tokens per split

  report = local.report
  at = {name: f'{path}:{n}' for name, n in number.items()}
  assert report['dropped']['exact duplicate'] == {
      'count': 2, 'examples': [f'{at["copy of 7"]} (of {path}:8)', f'{at["copy of 7 again"]} (of {path}:8)']}
  # The group A~B~C keeps A; C goes too, though it is not like A.
  assert report['dropped']['near duplicate'] == {'count': 3, 'examples': [
      f'{at["B"]} (of {at["A"]})', f'{at["near copy of 40"]} (of {path}:41)', f'{at["C"]} (of {at["A"]})']}
  assert {r: e['count'] for r, e in report['dropped'].items()} == {
      'exact duplicate': 2, 'near duplicate': 3, "missing field 'text'": 1, 'invalid JSON': 1, 'blank line': 1,
      'not valid UTF-8': 1}
  assert report['read']['documents'] == 310 and report['kept']['documents'] == 301
  assert report['validation']['documents'] >= 10 and report['train']['tokens'] > 10 * report['train']['documents']


def test_a_bad_record_fails_the_pipeline_in_one_clear_error_and_leaves_no_cache(corpus, tmp_path):
  path, _, _ = corpus
  messages = []
  for executor in ('local', 'beam'):
    with pytest.raises(JaxgptError) as failure:
      builder.prepare(_config(path, tmp_path, executor=executor, on_bad_utf8='error'), log=lambda m: None)
    messages.append(str(failure.value))
  assert messages[0] == messages[1]  # the same first bad record, in the same words
  assert messages[1].startswith(f'{path}:310 is not valid UTF-8') and messages[1].endswith('such documents.')
  assert os.listdir(tmp_path) == []  # nothing a later run would take for a cache
