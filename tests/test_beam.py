"""The Beam executor against the local one: the same kept documents, split, report and dataset on a planted, sharded
corpus; the same one clear error for a bad shard or record.

Beam's DirectRunner runs here in this process (its default), which still sends every transform and element through
Beam's pickling and coders; the documented command with two worker processes runs in tests/test_docs.py (data.md),
which compares it with the local executor too. Worker processes cost seconds per pipeline to start."""

import gzip
import json
import os
import random

import numpy as np
import pytest

from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, dedup
from jaxgpt.data.clean import minhash

pytest.importorskip('apache_beam', reason="the 'beam' extra is not installed")
from jaxgpt.data import beam_pipeline  # noqa: E402


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """JSONL shards of 300 distinct documents (seeded made-up words), 7 planted records and 3 bad ones, in the
  order read: 0.jsonl, 1.jsonl.gz, 2.jsonl.gz (fresh documents, cut short: a bad shard), 3.jsonl.

  Returns (the shards' directory, the planted records' texts by name, where(name or line) naming a record of the
  other shards as reports do, how many records the cut shard yields before its cut).
  """
  rng = random.Random(0)
  vocabulary = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(3, 9))) for _ in range(3000)]
  document = lambda: ' '.join(rng.choices(vocabulary, k=rng.randint(60, 150)))
  docs = [document() for _ in range(300)]
  lines = [json.dumps({'id': i, 'text': t} if i % 3 == 0 else {'text': t}) for i, t in enumerate(docs)]
  chain = rng.choices(vocabulary, k=220)  # A ~ B ~ C, each 20 words on from the one before: A and C are not alike
  edited = docs[40].split()
  edited[30] = 'edited'
  planted = {
      'copy of 7': {'text': '  ' + docs[7].upper().replace(' ', '\n ')},  # the same up to whitespace and case
      'A': {'text': ' '.join(chain[0:180])},
      'B': {'text': ' '.join(chain[20:200])},
      'near copy of 40': {'text': ' '.join(edited)},  # one word in about a hundred edited
      'copy of 7 again': {'id': 'x', 'text': docs[7]},  # in another shard than its original
      'C': {'text': ' '.join(chain[40:220])},  # in another shard than A and B
      'missing field': {'body': docs[0]},
  }
  for offset, record in enumerate(planted.values()):
    lines.insert(50 + 40 * offset, json.dumps(record))
  lines[290:290] = ['{"text": "unterminated', '']  # invalid JSON, a blank line
  raw = [line.encode() + b'\n' for line in lines] + [b'{"text": "caf\xe9"}']  # not UTF-8, and no final newline
  directory = tmp_path_factory.mktemp('beam')
  shards = {'0.jsonl': (0, 120), '1.jsonl.gz': (120, 230), '3.jsonl': (230, len(raw))}
  for name, (first, end) in shards.items():
    data = b''.join(raw[first:end])
    (directory / name).write_bytes(gzip.compress(data) if name.endswith('.gz') else data)
  fresh = gzip.compress(b''.join(json.dumps({'text': document()}).encode() + b'\n' for _ in range(12)))
  (directory / '2.jsonl.gz').write_bytes(fresh[:len(fresh) * 2 // 3])
  yielded = []
  with pytest.raises(EOFError), gzip.open(directory / '2.jsonl.gz') as f:
    yielded.extend(f)

  def where(line) -> str:
    line = line if isinstance(line, int) else lines.index(json.dumps(planted[line]))
    name, first = next((name, first) for name, (first, end) in shards.items() if first <= line < end)
    return f'{directory}/{name}:{line - first + 1}'

  return directory, {name: record.get('text') for name, record in planted.items()}, where, len(yielded)


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
  _, texts, _, _ = corpus
  cfg = base_config().data.clean
  a, b, c = (dedup.signature_values(minhash(texts[n], cfg.shingle_size, cfg.num_perm)) for n in 'ABC')
  assert dedup.bucket_links([('A', a), ('B', b)], cfg.near_dedup_threshold) == [('A', 'B')]
  assert dedup.bucket_links([('C', c), ('B', b)], cfg.near_dedup_threshold) == [('B', 'C')]
  assert dedup.bucket_links([('A', a), ('C', c)], cfg.near_dedup_threshold) == []
  bands = dedup.lsh_bands(cfg.near_dedup_threshold, cfg.num_perm)
  keys = {n: set(dedup.band_keys(v, *bands)) for n, v in zip('ABC', (a, b, c))}
  assert keys['A'] & keys['B'] and keys['B'] & keys['C']  # candidates, so the links are found
  assert dedup.keepers([((9, 'A'), (12, 'B')), ((12, 'B'), (20, 'C'))]) == {(12, 'B'): (9, 'A'), (20, 'C'): (9, 'A')}


def test_beam_and_local_prepare_the_same_dataset(corpus, tmp_path, monkeypatch):
  directory, _, where, yielded = corpus
  monkeypatch.setattr(beam_pipeline, '_PIECE_BYTES', 16 << 10)  # the split files in pieces: their lines add up
  records = 120 + 110 + yielded + 1 + 80  # the cut shard: what it yields, then one 'bad shard' record
  fields = {'max_docs': records - 1}  # all but the last record: the first max_docs in the order read are kept
  local = builder.prepare(_config(directory, tmp_path / 'local', **fields), log=lambda m: None)
  beam = builder.prepare(_config(directory, tmp_path / 'beam', executor='beam', **fields), log=lambda m: None)
  assert _clean_files(beam.directory) == _clean_files(local.directory)  # the same documents, split and order
  assert beam.tokenizer.fingerprint == local.tokenizer.fingerprint
  for split in ('train', 'validation'):  # the same examples in the same order, and so the same lengths
    lengths = [np.load(os.path.join(d, f'lengths-{split}.npy')) for d in (local.directory, beam.directory)]
    assert np.array_equal(*lengths)
    examples = [data.source(split) for data in (local, beam)]
    assert all(np.array_equal(a['tokens'], b['tokens']) for a, b in zip(*examples))
  assert beam.report['speed']['runner'] == 'DirectRunner' and 'runner' not in local.report['speed']
  del local.report['speed'], beam.report['speed']
  assert beam.report == local.report  # every count and example, and the documents, bytes and tokens per split

  report = local.report
  assert report['dropped']['exact duplicate'] == {
      'count': 2, 'examples': [f'{where("copy of 7")} (of {where(7)})', f'{where("copy of 7 again")} (of {where(7)})']}
  # The group A~B~C keeps A; C goes too, though it is not like A.
  assert report['dropped']['near duplicate'] == {'count': 3, 'examples': [
      f'{where("B")} (of {where("A")})', f'{where("near copy of 40")} (of {where(40)})',
      f'{where("C")} (of {where("A")})']}
  assert report['dropped']['bad shard']['examples'][0].startswith(
      f'{directory}/2.jsonl.gz (EOFError: Compressed file ended before the end-of-stream marker was reached, '
      f'after {directory}/2.jsonl.gz:{yielded})')
  assert {r: e['count'] for r, e in report['dropped'].items()} == {
      'exact duplicate': 2, 'near duplicate': 3, "missing field 'text'": 1, 'invalid JSON': 1, 'blank line': 1,
      'bad shard': 1}  # and the last record, not valid UTF-8, was not read
  assert report['read']['documents'] == records - 1 and report['kept']['documents'] == 301 + yielded
  assert report['validation']['documents'] >= 10 and report['train']['tokens'] > 10 * report['train']['documents']


def test_a_bad_shard_or_record_fails_the_pipeline_in_one_clear_error_and_leaves_no_cache(corpus, tmp_path):
  directory, _, where, yielded = corpus
  for setting, message in (('on_bad_shard', f'{directory}/2.jsonl.gz cannot be read after {directory}/2.jsonl.gz:'
                                            f'{yielded} (EOFError: Compressed file ended'),
                           ('on_bad_utf8', f'{where(309)} is not valid UTF-8')):
    messages = []
    for executor in ('local', 'beam'):
      with pytest.raises(JaxgptError) as failure:
        builder.prepare(_config(directory, tmp_path, executor=executor, **{setting: 'error'}), log=lambda m: None)
      messages.append(str(failure.value))
    assert messages[0] == messages[1]  # the same first bad shard or record, in the same words
    assert messages[1].startswith(message), messages[1]
  assert os.listdir(tmp_path) == []  # nothing a later run would take for a cache
