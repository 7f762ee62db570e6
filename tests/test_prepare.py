"""Data preparation end to end on planted corpora: exact report counts, nothing clean lost, determinism."""

import glob
import itertools
import json
import os
import re
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

from conftest import run_module
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, sources
from jaxgpt.data.clean import Cleaner

STDLIB = sysconfig.get_paths()['stdlib']
# Real, distinct documents; textwrap.py's header names its author's e-mail address.
CLEAN_FILES = ['string.py', 'shlex.py', 'json/decoder.py', 'fnmatch.py', 'bisect.py', 'colorsys.py', 'glob.py',
               'heapq.py', 'numbers.py', 'queue.py', 'stat.py', 'tabnanny.py']
DOC_CHARS = 3000


def _read(name, chars=DOC_CHARS):
  with open(os.path.join(STDLIB, name), encoding='utf-8') as f:
    return f.read()[:chars]


def _edit_words(text, every):
  """Replaces every `every`-th word: a near duplicate with 1/every of its words edited."""
  count = itertools.count(1)
  return re.sub(r'\S+', lambda m: 'EDITED' if next(count) % every == 0 else m.group(), text)


def _data_config(path, cache, **fields):
  data = base_config().data
  data.source, data.path, data.glob, data.cache_dir = 'dir', str(path), '**/*.txt', str(cache)
  data.vocab_size, data.num_workers = 500, 1
  data.clean.max_chars = 20_000
  data.clean.shingle_size, data.clean.near_dedup_threshold = 3, 0.7
  data.safety.profanity, data.safety.blocked_words, data.safety.scrub_pii = 'drop', ('frobnicate',), True
  for dotted, value in fields.items():
    node, *parts = data, *dotted.split('.')
    for name in parts[:-1]:
      node = node[name]
    node[parts[-1]] = value
  return data


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """A directory of 14 clean documents and 7 planted problems; returns (root, expected clean texts)."""
  root = tmp_path_factory.mktemp('planted')
  (root / 'clean').mkdir()
  (root / 'planted').mkdir()
  expected = []
  for i, name in enumerate(CLEAN_FILES):
    (root / 'clean' / f'{i:02d}.txt').write_text(_read(name))
    expected.append(_read(name))
  textwrap = _read('textwrap.py')
  assert textwrap.count('@') == 1
  (root / 'clean' / 'email.txt').write_text(textwrap)
  expected.append(textwrap.replace('gward@python.net', '<EMAIL>'))
  (root / 'clean' / 'bom.txt').write_bytes('\ufeff'.encode() + _read('sched.py').encode())
  expected.append(_read('sched.py'))
  # One abusive line in a long document: profanity is decided per document (the share of its lines), so it stays.
  one_bad_line = _read('keyword.py') + '\nyou are a fucking idiot\n'
  (root / 'clean' / 'one_bad_line.txt').write_text(one_bad_line)
  expected.append(one_bad_line)

  planted_files = {
      'crlf_copy.txt': _read('string.py').replace('\n', '\r\n').encode(),  # same text once normalised
      'near_copy.txt': _edit_words(_read('shlex.py'), 33).encode(),  # 3% of words edited
      'latin1.txt': 'caf\xe9 au lait\n'.encode('latin-1') * 50,
      'profane.txt': b'the weather was mild today\nyou are a fucking idiot\nwe walked to the station\n',
      'blocked.txt': (_read('token.py') + '\nhere we frobnicate\n').encode(),
      'empty.txt': b'  \n\n',
      'too_long.txt': _read('os.py', chars=25_000).encode(),
  }
  for name, content in planted_files.items():
    (root / 'planted' / name).write_bytes(content)
  return root, expected


def _clean_texts(directory):
  texts = []
  for split in ('train', 'validation'):
    with open(os.path.join(directory, f'clean-{split}.jsonl'), encoding='utf-8') as f:
      texts += [json.loads(line)['text'] for line in f]
  return texts


def test_planted_corpus_report_counts_exactly_and_keeps_every_clean_document(planted, tmp_path):
  root, expected = planted
  data = builder.prepare(_data_config(root, tmp_path), log=lambda m: None)
  report = data.report
  planted_dir = str(root / 'planted')
  assert report['read']['documents'] == 22
  assert {r: e['count'] for r, e in report['dropped'].items()} == {
      'exact duplicate': 1, 'near duplicate': 1, 'not valid UTF-8': 1, 'profanity': 2, 'empty': 1, 'too long': 1}
  assert report['dropped']['exact duplicate']['examples'] == [
      f'{planted_dir}/crlf_copy.txt (of {root}/clean/00.txt)']
  assert report['dropped']['near duplicate']['examples'] == [
      f'{planted_dir}/near_copy.txt (of {root}/clean/01.txt)']
  assert report['dropped']['not valid UTF-8']['examples'] == [
      f"{planted_dir}/latin1.txt (invalid continuation byte at byte 3)"]
  assert report['dropped']['profanity']['examples'] == [
      f"{planted_dir}/blocked.txt (frobnicate: 'here we frobnicate')",
      f"{planted_dir}/profane.txt (classifier flagged 33% of distinct lines: 'you are a fucking idiot')"]
  assert report['dropped']['too long']['examples'] == [f'{planted_dir}/too_long.txt (25000 > 20000 characters)']
  assert {r: e['count'] for r, e in report['changed'].items()} == {'BOM removed': 1, 'PII scrubbed: email': 1}
  assert report['kept']['documents'] == 15 == report['train']['documents'] + report['validation']['documents']
  assert report['kept']['bytes'] == sum(len(t.encode()) for t in expected)

  assert sorted(_clean_texts(data.directory)) == sorted(expected)  # no clean document lost or altered
  decoded = sorted(data.tokenizer.decode(ex['tokens'][1:-1]) for split in ('train', 'validation')
                   for ex in data.source(split))
  assert decoded == sorted(expected)  # and the dataset holds exactly them
  t = report['tokenizer']
  assert t['kind'] == 'sentencepiece' and t["vocab_size"] == 500 and t['unknown_rate'] == 0.0
  assert 0.1 < t['tokens_per_byte'] < 1
  assert report['train']['tokens'] == sum(len(ex['tokens']) for ex in data.source('train'))
  assert report['speed']['docs_per_s'] > 0 and report['speed']['mb_per_s'] > 0


def test_same_input_gives_byte_identical_output_with_any_number_of_workers(planted, tmp_path):
  root, _ = planted
  first = builder.prepare(_data_config(root, tmp_path / 'a', num_workers=1), log=lambda m: None)
  second = builder.prepare(_data_config(root, tmp_path / 'b', num_workers=2), log=lambda m: None)
  assert os.path.basename(first.directory) == os.path.basename(second.directory)
  for name in ('clean-train.jsonl', 'clean-validation.jsonl', 'tokenizer.model',
               'lengths-train.npy', 'lengths-validation.npy'):
    with open(os.path.join(first.directory, name), 'rb') as a, open(os.path.join(second.directory, name), 'rb') as b:
      assert a.read() == b.read(), name
  for split in ('train', 'validation'):
    for x, y in zip(first.source(split), second.source(split), strict=True):
      np.testing.assert_array_equal(x['tokens'], y['tokens'])
  without_speed = lambda r: {k: v for k, v in r.items() if k != 'speed'}
  assert without_speed(first.report) == without_speed(second.report)


def test_jsonl_structure_problems_are_dropped_with_line_numbers(tmp_path):
  docs = [_read(name) for name in CLEAN_FILES[:6]]
  lines = [json.dumps({'text': docs[0]}).encode(), b'{not json', b'[1, 2]', json.dumps({'body': 'x'}).encode(),
           json.dumps({'text': 5}).encode(), json.dumps({'text': '  '}).encode(), b'',
           b'{"text": "caf\xe9"}', *(json.dumps({'text': d}).encode() for d in docs[1:])]
  path = tmp_path / 'corpus.jsonl'
  path.write_bytes(b'\n'.join(lines) + b'\n')
  cfg = _data_config(path, tmp_path / 'cache', source='jsonl')
  data = builder.prepare(cfg, log=lambda m: None)
  dropped = data.report['dropped']
  assert {r: e['examples'] for r, e in dropped.items()} == {
      'invalid JSON': [f'{path}:2 (Expecting property name enclosed in double quotes)'],
      'not a JSON object': [f'{path}:3 (list)'],
      "missing field 'text'": [f'{path}:4'],
      "field 'text' is not a string": [f'{path}:5'],
      "empty field 'text'": [f'{path}:6'],
      'blank line': [f'{path}:7'],
      'not valid UTF-8': [f'{path}:8 (invalid continuation byte at byte 13)'],
  }
  assert sorted(_clean_texts(data.directory)) == sorted(docs)


def test_repairing_bad_utf8_keeps_the_document_and_counts_it(tmp_path):
  path = tmp_path / 'corpus.jsonl'
  whole_files = [json.dumps({'text': _read(name, chars=None)}).encode() for name in ('string.py', 'shlex.py')]
  path.write_bytes(b'\n'.join([b'{"text": "caf\xe9 au lait"}', *whole_files]) + b'\n')  # enough for 500 pieces
  cfg = _data_config(path, tmp_path / 'cache', source='jsonl', on_bad_utf8='repair')
  data = builder.prepare(cfg, log=lambda m: None)
  assert data.report['changed']['invalid UTF-8 repaired']['examples'] == [
      f'{path}:1 (invalid continuation byte at byte 13)']
  assert 'caf\ufffd au lait' in _clean_texts(data.directory)


def _validation_texts(directory):
  with open(os.path.join(directory, 'clean-validation.jsonl'), encoding='utf-8') as f:
    return {json.loads(line)['text'] for line in f}


def test_inserting_a_jsonl_line_moves_no_other_document_between_splits(tmp_path):
  names = sorted(os.path.relpath(p, STDLIB) for p in glob.glob(os.path.join(STDLIB, '*.py'))
                 if os.path.getsize(p) > DOC_CHARS)[:40]
  docs = [_read(name) for name in names]
  added = _read('json/decoder.py')
  # With line-number keys, every document's key would change and documents would change split.
  by_line = lambda texts, first: {t for n, t in enumerate(texts, first) if sources.in_validation(str(n), 0.25)}
  assert by_line(docs, 1) != by_line(docs, 2)
  held_out = []
  for name, texts in (('before', docs), ('after', [added, *docs])):
    path = tmp_path / f'{name}.jsonl'
    path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    cfg = _data_config(path, tmp_path / 'cache', source='jsonl', val_fraction=0.25)
    data = builder.prepare(cfg, log=lambda m: None)
    assert data.report['dropped'] == {}
    held_out.append(_validation_texts(data.directory))
  before, after = held_out
  assert 3 < len(before) < 20
  assert after - {added} == before


def test_jsonl_records_are_keyed_by_their_id_or_else_their_content():
  key = sources.jsonl_key
  # An id keeps a record in its split whatever its text, field order or line.
  assert key(b'{"id": "doc-7", "text": "one"}\n', 'id') == key(b' {"text": "two", "id": "doc-7"}', 'id')
  assert key(b'{"id": 7, "text": "one"}', 'id') != key(b'{"id": "7", "text": "one"}', 'id')
  # Without one (or with id_field=''), the line's content is the key: identical lines, identical keys.
  assert key(b'{"text": "one"}\n', 'id') == key(b'{"text": "one"}\r\n', 'id') != key(b'{"text": "two"}\n', 'id')
  assert key(b'{"id": "doc-7", "text": "one"}', '') == key(b'{"id": "doc-7", "text": "one"}\n', 'id_missing')
  for no_id in (b'[1]', b'""', b'true'):  # not a non-empty string or an integer
    assert key(b'{"id": %s, "text": "one"}' % no_id, 'id').startswith('sha256:')
  assert key(b'{"id": "x", not json', 'id').startswith('sha256:')


def test_instruction_records_become_one_formatted_document():
  cfg = _data_config('unused.jsonl', 'unused', source='jsonl', instruction_field='q', response_field='a')
  line = json.dumps({'q': 'Add 2 and 2.', 'a': '4'}).encode()
  outcome = Cleaner(cfg)(sources.Record('1', 'x.jsonl:1', len(line), line))
  assert outcome.text == '<|user|>\nAdd 2 and 2.\n<|assistant|>\n4'
  missing = Cleaner(cfg)(sources.Record('2', 'x.jsonl:2', 0, b'{"q": "hi"}'))
  assert missing.text is None and missing.dropped == "missing field 'a'"


def test_a_tiny_corpus_still_gets_a_validation_document(tmp_path):
  assert not any(sources.in_validation(k, 0.05) for k in ('a.txt', 'b.txt'))
  (tmp_path / 'a.txt').write_text(_read('string.py', chars=None))
  (tmp_path / 'b.txt').write_text(_read('shlex.py', chars=None))
  data = builder.prepare(_data_config(tmp_path, tmp_path / 'cache'), log=lambda m: None)
  assert data.report['train']['documents'] == data.report['validation']['documents'] == 1


class PlantedText(tfds.core.GeneratorBasedBuilder):
  """A small local TFDS dataset standing in for any registered one."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'content': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, name in enumerate(CLEAN_FILES[:5]):
      yield i, {'content': _read(name)}
    yield 5, {'content': _read(CLEAN_FILES[0])}  # a duplicate


def test_tfds_dataset_by_name_is_a_source(tmp_path):
  tfds.disable_progress_bar()
  PlantedText(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  cfg = _data_config(tmp_path / 'tfds', tmp_path / 'cache', source='tfds', tfds_name='planted_text',
                     text_field='content')
  data = builder.prepare(cfg, log=lambda m: None)
  assert data.report['read']['documents'] == 6
  (example,) = data.report['dropped']['exact duplicate']['examples']  # TFDS stores examples in its own order
  assert re.fullmatch(r'planted_text/train\[\d\] \(of planted_text/train\[\d\]\)', example)
  assert sorted(_clean_texts(data.directory)) == sorted(_read(n) for n in CLEAN_FILES[:5])
  with pytest.raises(JaxgptError, match="no feature 'text'"):
    builder.prepare(_data_config(tmp_path / 'tfds', tmp_path / 'cache', source='tfds', tfds_name='planted_text'))


def test_byte_level_bpe_tokenizer_is_used_and_saved_with_the_dataset(planted, tmp_path):
  root, expected = planted
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(expected, tokenizers.trainers.BpeTrainer(
      vocab_size=500, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'tokenizer.json'))
  cfg = _data_config(root, tmp_path / 'cache', **{'tokenizer.kind': 'byte_bpe',
                                                  'tokenizer.path': str(tmp_path / 'tokenizer.json')})
  data = builder.prepare(cfg, log=lambda m: None)
  assert data.report['tokenizer']['kind'] == 'byte_bpe' and data.tokenizer.kind == 'byte_bpe'
  eot = tok.token_to_id('<|endoftext|>')
  decoded = []
  for split in ('train', 'validation'):
    for ex in data.source(split):
      assert ex['tokens'][0] == ex['tokens'][-1] == eot
      decoded.append(data.tokenizer.decode(ex['tokens'][1:-1]))
  assert sorted(decoded) == sorted(expected)


def test_prepare_command_builds_the_cache_training_reads_and_fails_in_one_line(planted, tmp_path):
  root, _ = planted
  quickstart = ['--config', 'configs/quickstart.py', '--config.data.source=dir']
  result = run_module('jaxgpt.prepare', *quickstart, f'--config.data.path={root}', f'--config.data.cache_dir={tmp_path}',
                      '--config.data.vocab_size=500', '--config.data.num_workers=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'data report:' in result.stdout and 'dropped: exact duplicate' in result.stdout
  directory = result.stdout.strip().splitlines()[-1].removeprefix('dataset: ')
  with open(os.path.join(directory, 'report.json')) as f:
    assert json.load(f)['read']['documents'] == 22
  cfg = base_config().data  # what training reads with the same settings
  cfg.source, cfg.path, cfg.cache_dir, cfg.vocab_size, cfg.num_workers = 'dir', str(root), str(tmp_path), 500, 1
  data = builder.prepare(cfg, log=lambda m: None)
  assert data.reused and data.directory == directory

  bad = run_module('jaxgpt.prepare', *quickstart, f'--config.data.path={tmp_path}/missing')
  assert bad.returncode == 2
  assert bad.stderr.strip() == (f"error: data.path='{tmp_path}/missing' is not a directory. "
                                'Point it at a directory of text files.')
