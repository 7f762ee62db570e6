"""Raw text -> cleaned text -> tokenizer + tokenized TFDS dataset (array_record), cached on disk.

`prepare` is idempotent: the cache directory's name is a fingerprint of the
data settings and of the source files' sizes and modification times, so a
second run reuses the tokenizer and dataset, and changed input rebuilds them.
The directory is built under a temporary name and renamed when complete, so a
crash never leaves a half-written cache that a later run would trust. A cache
in a bucket (data.cache_dir=gs://...) is built in a local temporary directory,
since ArrayRecord cannot write to a bucket, then uploaded with its report last:
the report is what marks a cache complete.
"""

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra
from jaxgpt.data import corpus, instructions, pipeline, sources
from jaxgpt.data.report import SPLITS, Report, table
from jaxgpt.data.tokenizer import Tokenizer, load_byte_level_bpe, train_tokenizer

# Bump when the on-disk layout or tokenization changes, to invalidate old caches.
_FORMAT_VERSION = 4  # 4: JSONL records split by id or content hash, not line number
# Settings that change how data is read or where it is kept, not what it is.
# ('mixture': a source of a mixture is prepared with it empty; a mixture's caches are its sources'.)
_SETTINGS_NOT_IN_DATA = ('cache_dir', 'shuffle', 'num_workers', 'executor', 'beam_args', 'mixture')
_ENCODE_BATCH = 256
TOKENIZER_FILE = 'tokenizer.model'
REPORT_FILE = 'report.json'


class TokenizedText(tfds.core.GeneratorBasedBuilder):
  """One example per document: its token ids, framed by BOS and EOS; for instruction data also
  `loss_mask`, 1 on the tokens trained on (the responses)."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, documents=None, masked: bool = False, **kwargs):
    self._documents = documents  # split name -> iterator of examples; only when preparing
    self._masked = masked
    super().__init__(**kwargs)

  def _info(self):
    features = {'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32)}
    if self._masked:
      features['loss_mask'] = tfds.features.Tensor(shape=(None,), dtype=np.uint8)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(docs) for split, docs in self._documents.items()}

  def _generate_examples(self, docs):
    yield from enumerate(docs)

  # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" around
  # every build. Nothing is downloaded here, and `prepare` logs its own progress.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


@dataclasses.dataclass
class PreparedData:
  directory: str  # a local path or a bucket URL
  tokenizer: Tokenizer
  report: dict
  reused: bool = False  # found in the cache rather than built now

  def source(self, split: str):
    """A random-access source of {'tokens': int32 array} for Grain, one per document."""
    return tfds.builder_from_directory(self._tfds_dir()).as_data_source(split)

  def chunks(self, split: str, chunk_len: int) -> pipeline.DocumentChunks:
    """The split as pieces of at most `chunk_len` tokens, the unit that training shuffles."""
    with (paths.path(self.directory) / f'lengths-{split}.npy').open('rb') as f:
      lengths = np.load(f)
    return pipeline.DocumentChunks(self.source(split), lengths, chunk_len)

  def _tfds_dir(self) -> str:
    return str(paths.path(self.directory) / 'tfds' / 'tokenized_text' / str(TokenizedText.VERSION))


def _fingerprint(data_cfg, source: sources.Source, tokenizer: Tokenizer | None) -> str:
  """Changes whenever a setting or an input that shapes the dataset changes."""
  settings = {k: v for k, v in data_cfg.to_dict().items() if k not in _SETTINGS_NOT_IN_DATA}
  if tokenizer is not None:
    settings['given_tokenizer'] = tokenizer.fingerprint
  files = [paths.expand(p) for p in (data_cfg.tokenizer.path, data_cfg.safety.blocked_words_file) if p]
  stats = [(p, stat.size, stat.mtime_ns) for p, stat in zip(files, map(_stat_or_none, files)) if stat]
  blob = json.dumps([_FORMAT_VERSION, source.root, settings, source.identity(), stats], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fingerprint(data_cfg) -> str:
  """The fingerprint of a source's data settings and input files, before any tokenizer is given."""
  return _fingerprint(data_cfg, sources.open_source(data_cfg), None)


def _stat_or_none(file: str) -> paths.FileStat | None:
  try:
    return paths.stat(file)
  except FileNotFoundError:  # reported by whatever reads it
    return None


def _tokenized(texts: Iterator[str], tokenizer: Tokenizer, counts: dict, masked: bool) -> Iterator[dict]:
  def framed(batch):
    for ids in tokenizer.encode_batch(batch):
      yield np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32), None

  for batch in corpus.batched(texts, _ENCODE_BATCH):
    for text, (ids, mask) in zip(batch, instructions.encode(tokenizer, batch) if masked else framed(batch)):
      counts['documents'] += 1
      counts['bytes'] += len(instructions.without_markers(text).encode('utf-8'))
      counts['tokens'] += len(ids)
      counts['unknown'] += int(np.count_nonzero(ids == tokenizer.unk_id)) if tokenizer.unk_id is not None else 0
      yield {'tokens': ids} if mask is None else {'tokens': ids, 'loss_mask': mask}


def _make_tokenizer(data_cfg, directory: str, log) -> Tokenizer:
  tok_cfg = data_cfg.tokenizer
  start = time.time()
  if tok_cfg.kind == 'byte_bpe':
    tokenizer = load_byte_level_bpe(tok_cfg.path, tok_cfg.eos_token)
    log(f'data: loaded a {tokenizer.vocab_size}-piece byte-level BPE tokenizer from {tok_cfg.path}')
    return tokenizer
  texts = map(instructions.without_markers, corpus.read_clean(directory, 'train'))
  tokenizer = train_tokenizer(texts, data_cfg.vocab_size,
                              tok_cfg.model_type, tok_cfg.special_tokens)
  log(f'data: trained a {tokenizer.vocab_size}-piece {tok_cfg.model_type.upper()} tokenizer '
      f'in {time.time() - start:.1f}s')
  return tokenizer


def _load(directory, reused: bool) -> 'PreparedData':
  report = json.loads((directory / REPORT_FILE).read_text())
  return PreparedData(str(directory), Tokenizer.load(directory / TOKENIZER_FILE), report, reused)


def check_settings(data_cfg) -> None:
  """The data fields' own constraints (config.validate checks those that span sections)."""
  problems = []
  for field, value, allowed in (
      ('executor', data_cfg.executor, ('local', 'beam')),
      ('tokenizer.kind', data_cfg.tokenizer.kind, ('sentencepiece', 'byte_bpe')),
      ('tokenizer.model_type', data_cfg.tokenizer.model_type, ('bpe', 'unigram')),
      ('clean.unicode_form', data_cfg.clean.unicode_form, ('NFC', 'NFKC', '')),
      ('safety.profanity', data_cfg.safety.profanity, ('off', 'flag', 'drop')),
      ('format', data_cfg.format, instructions.FORMATS)):
    if value not in allowed:
      problems.append(f'data.{field}={value!r} is not one of {", ".join(map(repr, allowed))}')
  if data_cfg.format != 'text' and data_cfg.source not in ('jsonl', 'parquet', 'arrow'):
    problems.append(f"data.format={data_cfg.format!r} reads records with fields: set data.source='jsonl' "
                    "(or 'parquet', 'arrow')")
  if data_cfg.source == 'tfds' and not data_cfg.tfds_name:
    problems.append("data.source='tfds' needs data.tfds_name")
  if data_cfg.tokenizer.kind == 'byte_bpe' and not data_cfg.tokenizer.path:
    problems.append("data.tokenizer.kind='byte_bpe' needs data.tokenizer.path (tokenizer.json or vocab/merges dir)")
  if bool(data_cfg.instruction_field) != bool(data_cfg.response_field):
    problems.append('set both data.instruction_field and data.response_field, or neither')
  if not 0 < data_cfg.clean.near_dedup_threshold <= 1:
    problems.append(f'data.clean.near_dedup_threshold={data_cfg.clean.near_dedup_threshold} must be in (0, 1]')
  if problems:
    raise JaxgptError('invalid data config: ' + '; '.join(problems) + '.')


def prepare(data_cfg, log=print, tokenizer: Tokenizer | None = None, pipeline_args=()) -> PreparedData:
  """Returns the cached tokenizer and dataset for `data_cfg`, building them if needed.

  Building: clean, deduplicate and split the source (corpus.py), train or load
  the tokenizer (or use `tokenizer`, a base model's, over data.tokenizer),
  tokenize into TFDS array_record, and write the report. With data.executor='beam' the cleaning runs as an
  Apache Beam pipeline (beam_pipeline.py) with data.beam_args and `pipeline_args` (--runner=..., ...).
  """
  if data_cfg.mixture:  # several sources, each prepared here (jaxgpt/data/mixture.py)
    from jaxgpt.data import mixture  # it imports this module
    return mixture.prepare(data_cfg, log, tokenizer, pipeline_args)
  check_settings(data_cfg)
  source = sources.open_source(data_cfg)
  cache_root = paths.path(data_cfg.cache_dir)
  directory = cache_root / f'{data_cfg.source}-{_fingerprint(data_cfg, source, tokenizer)}'
  if (directory / REPORT_FILE).exists():
    log(f'data: reusing {directory}')
    return _load(directory, reused=True)

  start = time.time()
  tfds.disable_progress_bar()  # our own log lines say what happens; TFDS's bars flood the console
  log(f'data: preparing {source.root} ({data_cfg.source})')
  paths.check_writable(cache_root, 'data.cache_dir')
  if paths.is_remote(directory):
    with tempfile.TemporaryDirectory(prefix='jaxgpt-data-') as building:
      report = _build(source, data_cfg, building, log, tokenizer, pipeline_args)
      log(f'data: uploading to {directory}')
      directory.rmtree(missing_ok=True)  # what an upload killed midway left
      paths.upload_tree(building, directory, last=REPORT_FILE)
  else:
    building = f'{directory}.building-{os.getpid()}'
    shutil.rmtree(building, ignore_errors=True)
    os.makedirs(building)
    try:
      report = _build(source, data_cfg, building, log, tokenizer, pipeline_args)
    except BaseException:
      shutil.rmtree(building, ignore_errors=True)
      raise
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(building, directory)
  log(table(report))
  log(f'data: ready in {time.time() - start:.1f}s at {directory}')
  return _load(directory, reused=False)


def _build(source: sources.Source, data_cfg, building: str, log, tokenizer: Tokenizer | None, pipeline_args) -> dict:
  report = Report()
  if data_cfg.executor == 'beam':
    require_extra('beam', 'apache_beam')
    from jaxgpt.data import beam_pipeline
    beam_pipeline.clean_corpus(source, data_cfg, building, report, pipeline_args)
  else:
    corpus.clean_corpus(source, data_cfg, building, report)
  tokenizer = tokenizer or _make_tokenizer(data_cfg, building, log)
  tokenizer.save(os.path.join(building, TOKENIZER_FILE))

  counts = {split: collections.Counter(documents=0, bytes=0, tokens=0, unknown=0) for split in SPLITS}
  masked = data_cfg.format != 'text'
  documents = {split: _tokenized(corpus.read_clean(building, split), tokenizer, counts[split], masked)
               for split in SPLITS}
  start = time.time()
  builder = TokenizedText(documents=documents, masked=masked, data_dir=os.path.join(building, 'tfds'),
                          file_format='array_record')
  builder.download_and_prepare()
  tokens = sum(c['tokens'] for c in counts.values())
  report.speed['tokens_per_s'] = tokens / max(time.time() - start, 1e-9)

  prepared = PreparedData(building, tokenizer, {})
  for split in SPLITS:  # read back: TFDS stores examples in its own (shuffled) order
    lengths = np.array([len(ex['tokens']) for ex in prepared.source(split)], np.int64)
    np.save(os.path.join(building, f'lengths-{split}.npy'), lengths)
  train = counts['train']
  report.splits = {split: {k: counts[split][k] for k in ('documents', 'bytes', 'tokens')} for split in SPLITS}
  report.tokenizer = {'kind': tokenizer.kind, 'vocab_size': tokenizer.vocab_size,
                      'fingerprint': tokenizer.fingerprint,
                      'tokens_per_byte': train['tokens'] / max(1, train['bytes']),
                      'unknown_rate': train['unknown'] / max(1, train['tokens'])}
  result = report.to_dict()
  with open(os.path.join(building, REPORT_FILE), 'w') as f:
    json.dump(result, f, indent=2)
  return result
