import json
import os
import sysconfig

import numpy as np
import pytest

from jaxgpt.config import JaxgptError
from jaxgpt.data import builder, pipeline, sources
from jaxgpt.data.tokenizer import train_tokenizer

STDLIB = sysconfig.get_paths()['stdlib']


def test_tokenizer_round_trips_python_source_exactly():
  files = ['textwrap.py', 'json/decoder.py', 'string.py', 'shlex.py']
  texts = [open(os.path.join(STDLIB, f), encoding='utf-8').read() for f in files]
  tokenizer = train_tokenizer(texts[:3], vocab_size=600)
  held_out = texts[3]  # unseen text, with indentation, tabs-free code and unicode-free quoting
  assert tokenizer.decode(tokenizer.encode(held_out)) == held_out
  weird = 'x = "naïve — ☃"\n\tif  y:\n\t\treturn   1\r\n'  # bytes never seen in training
  assert tokenizer.decode(tokenizer.encode(weird)) == weird
  assert len(tokenizer.encode(held_out)) < len(held_out.encode()) / 2  # it actually compresses


def test_split_is_deterministic_by_key_and_near_the_fraction():
  keys = [f'dir/file_{i}.txt' for i in range(1000)]
  held_out = [k for k in keys if sources.in_validation(k, 0.1)]
  assert 60 < len(held_out) < 140
  # Pinned: the same keys are held out in every process and every run (a salted hash such as Python's
  # hash() would change them between processes; a new hash function would reshuffle every cached split).
  assert len(held_out) == 113 and held_out[:3] == ['dir/file_12.txt', 'dir/file_14.txt', 'dir/file_16.txt']
  # A larger fraction only adds documents to validation: none moves the other way.
  assert set(held_out) < {k for k in keys if sources.in_validation(k, 0.2)}


def _dir_config(tiny_config, path, **fields):
  data = tiny_config.data
  data.source, data.path, data.glob, data.max_docs = 'dir', str(path), '**/*.txt', 0
  data.vocab_size = 400
  for k, v in fields.items():
    data[k] = v
  return data


def _write_corpus(root, n=12):
  text = open(os.path.join(STDLIB, 'textwrap.py'), encoding='utf-8').read()
  for i in range(n):
    (root / f'doc{i}.txt').write_text(text[i * 1600:(i + 1) * 1600])  # distinct slices: none a near duplicate


def test_non_utf8_files_are_skipped_and_named(tiny_config, tmp_path):
  _write_corpus(tmp_path)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 50)
  (tmp_path / 'blank.txt').write_text('  \n\n')
  data = builder.prepare(_dir_config(tiny_config, tmp_path, cache_dir=str(tmp_path / 'cache')), log=lambda m: None)
  dropped = data.report['dropped']
  assert dropped['not valid UTF-8']['count'] == 1
  assert dropped['not valid UTF-8']['examples'][0].startswith(str(tmp_path / 'latin1.txt'))
  assert dropped['empty']['count'] == 1
  assert data.report['train']['documents'] + data.report['validation']['documents'] == 12


def test_non_utf8_file_is_an_error_when_asked(tiny_config, tmp_path):
  _write_corpus(tmp_path)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1') * 50)
  cfg = _dir_config(tiny_config, tmp_path, cache_dir=str(tmp_path / 'cache'), on_bad_utf8='error')
  with pytest.raises(JaxgptError, match=r'latin1\.txt is not valid UTF-8'):
    builder.prepare(cfg, log=lambda m: None)


def test_a_directory_without_usable_text_is_one_clear_error(tiny_config, tmp_path):
  with pytest.raises(JaxgptError, match='no files matching'):
    builder.prepare(_dir_config(tiny_config, tmp_path), log=lambda m: None)
  for i in range(3):
    (tmp_path / f'empty{i}.txt').write_text('\n')
  with pytest.raises(JaxgptError, match='no usable text'):
    builder.prepare(_dir_config(tiny_config, tmp_path, cache_dir=str(tmp_path / 'c')), log=lambda m: None)


def test_jsonl_source_skips_bad_lines_with_line_numbers(tiny_config, tmp_path):
  text = open(os.path.join(STDLIB, 'textwrap.py'), encoding='utf-8').read()
  lines = [json.dumps({'text': text[i * 1300:(i + 1) * 1300]}) for i in range(15)]  # distinct slices
  lines[3] = '{not json'
  lines[5] = json.dumps({'body': 'wrong field'})
  path = tmp_path / 'corpus.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  cfg = tiny_config.data
  cfg.source, cfg.path, cfg.vocab_size, cfg.max_docs = 'jsonl', str(path), 400, 0
  cfg.cache_dir = str(tmp_path / 'cache')
  data = builder.prepare(cfg, log=lambda m: None)
  dropped = data.report['dropped']
  assert [e.split(' ')[0] for e in dropped['invalid JSON']['examples']] == [f'{path}:4']
  assert dropped["missing field 'text'"]['examples'] == [f'{path}:6']
  assert data.report['train']['documents'] + data.report['validation']['documents'] == 13


def test_prepare_reuses_its_cache(tiny_config):
  logs = []
  first = builder.prepare(tiny_config.data, log=logs.append)
  second = builder.prepare(tiny_config.data, log=logs.append)
  assert first.directory == second.directory
  assert first.tokenizer.fingerprint == second.tokenizer.fingerprint
  assert logs[-1].startswith('data: reusing')
  assert len(first.source('train')) + len(first.source('validation')) <= 80


def test_packed_batches_never_cross_documents(tiny_config):
  data = builder.prepare(tiny_config.data, log=lambda m: None)
  # Pieces shorter than a row, so that every row holds several and their boundaries are tested.
  it = pipeline.make_iterator(data.chunks('train', 40), seq_len=64, local_batch_size=8, seed=0, shuffle=True)
  bos = data.tokenizer.bos_id
  boundaries = 0
  for _ in range(20):
    b = next(it)
    assert b['inputs'].shape == (8, 64) and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    # Every document starts with BOS at position 0, and no target crosses into the next one.
    starts = b['inputs'] == bos
    assert (b['positions'][starts] == 0).all()
    new_doc = b['segment_ids'][:, 1:] != b['segment_ids'][:, :-1]
    assert (b['loss_mask'][:, :-1][new_doc] == 0).all()
    assert (b['targets'][b['loss_mask'] == 1] != bos).all()
    boundaries += int(new_doc.sum())
    assert ((b['positions'][:, 1:] == b['positions'][:, :-1] + 1) | new_doc).all()
  assert boundaries > 0


def test_packed_documents_end_with_eos_and_the_next_starts_with_bos():
  """Short framed documents (the stdlib's are long: EOS is rare in a few batches), packed as training packs them."""
  bos, eos = 1, 2
  rng = np.random.default_rng(0)
  docs = [{'tokens': np.array([bos, *rng.integers(3, 50, int(rng.integers(3, 20))), eos], np.int32)}
          for _ in range(40)]
  batch = next(pipeline.make_iterator(docs, seq_len=32, local_batch_size=4, seed=0, shuffle=False,
                                      process_index=0, process_count=1))
  ended = batch['inputs'][:, :-1] == eos
  assert ended.sum() >= 4  # every row holds several documents
  new_doc = batch['segment_ids'][:, 1:] != batch['segment_ids'][:, :-1]
  assert new_doc[ended].all() and (batch['inputs'][:, 1:][ended] == bos).all()
  assert (batch['loss_mask'][:, :-1][ended] == 0).all()  # EOS -> next BOS is not a target
  # The EOS itself is predicted: the target after each document's last text token.
  assert ((batch['targets'] == eos) & (batch['loss_mask'] == 1)).sum() >= ended.sum()


def test_restored_iterator_yields_the_same_batches(tiny_config):
  data = builder.prepare(tiny_config.data, log=lambda m: None)

  def fresh():
    return pipeline.make_iterator(data.chunks('train', 65), seq_len=64, local_batch_size=4, seed=7, shuffle=True)

  it = fresh()
  for _ in range(13):
    next(it)
  saved = it.get_state()
  expected = [next(it) for _ in range(5)]
  restored = fresh()
  restored.set_state(saved)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_documents(tiny_config):
  data = builder.prepare(tiny_config.data, log=lambda m: None)
  source = data.chunks('train', 65)
  firsts = []
  for index in range(2):
    it = pipeline.make_iterator(source, seq_len=64, local_batch_size=2, seed=0, shuffle=False,
                                process_index=index, process_count=2)
    firsts.append(next(it)['inputs'])
  assert not np.array_equal(firsts[0], firsts[1])
  np.testing.assert_array_equal(firsts[0][0, :20], np.asarray(source[0]['tokens'][:20]))
  np.testing.assert_array_equal(firsts[1][0, :20], np.asarray(source[1]['tokens'][:20]))
