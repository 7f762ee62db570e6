"""Raw text -> cleaned text -> tokenizer + tokenized TFDS dataset (array_record), cached on disk.

`prepare` is idempotent: the cache directory's name is a fingerprint of the
data settings and of the source files' sizes and modification times, so a
second run reuses the tokenizer and dataset, and changed input rebuilds them.
The directory is built under a temporary name and renamed when complete, so a
crash never leaves a half-written cache that a later run would trust. A cache
in a bucket (data.cache_dir=gs://...) is built in a local temporary directory,
since ArrayRecord cannot write to a bucket, then uploaded with its report last:
the report is what marks a cache complete. (On Beam, whose workers cannot reach
this machine's disk, they write the dataset's shards into the bucket themselves,
each written locally and uploaded; the report still comes last.)
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
from jaxgpt.data import corpus, instructions, pipeline, preference, sources
from jaxgpt.data.report import SPLITS, Report, table
from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.tokenizer import Tokenizer, train_tokenizer

# Bump when the on-disk layout or tokenization changes, to invalidate old caches.
_FORMAT_VERSION = 4  # 4: JSONL records split by id or content hash, not line number
# Settings that change how data is read or where it is kept, not what it is.
# ('mixture': a source of a mixture is prepared with it empty; a mixture's caches are its sources'.)
_SETTINGS_NOT_IN_DATA = ('cache_dir', 'shuffle', 'num_workers', 'executor', 'beam_args', 'mixture')
_ENCODE_BATCH = 256
_COPY_BYTES = 16 << 20
TOKENIZER_FILE = 'tokenizer.model'
REPORT_FILE = 'report.json'
_TEXT_FEATURES = {'tokens': np.int32}
_INSTRUCTION_FEATURES = {'tokens': np.int32, 'loss_mask': np.uint8}


class TokenizedText(tfds.core.GeneratorBasedBuilder):
  """One example per document: its token ids, framed by BOS and EOS; for instruction data also
  `loss_mask`, 1 on the tokens trained on (the responses); for preference data a pair (preference.FEATURES)."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, documents=None, features: dict | None = None, **kwargs):
    self._documents = documents  # split name -> iterator of examples; only when preparing
    self._features = features or _TEXT_FEATURES  # name -> dtype of each example's 1-D arrays
    super().__init__(**kwargs)

  def _info(self):
    features = {name: tfds.features.Tensor(shape=(None,), dtype=dtype) for name, dtype in self._features.items()}
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


class TokenizedOnWorkers(TokenizedText, skip_registration=True):
  """TokenizedText's dataset (the same name, version, features and files) from Beam's workers: each split's
  examples are a PTransform of (key, example) (beam_pipeline.py)."""

  name = TokenizedText.name

  def _generate_examples(self, transform):
    return transform

  def _example_writer(self):
    return _LocalThenUpload(self.info.file_format)


class _LocalThenUpload(tfds.core.ExampleWriter):
  """ArrayRecord writes local files only: a shard bound for a bucket is written here, then uploaded."""

  def write(self, path, examples):
    if not paths.is_remote(path):
      return super().write(path, examples)
    with tempfile.TemporaryDirectory(prefix='jaxgpt-shard-') as local:
      positions = super().write(os.path.join(local, 'shard'), examples)
      with open(os.path.join(local, 'shard'), 'rb') as shard, paths.path(path).open('wb') as upload:
        shutil.copyfileobj(shard, upload, _COPY_BYTES)
    return positions


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
    lengths = self._lengths(split)
    if lengths.ndim > 1:
      raise JaxgptError(f"{self.directory} holds preference pairs (data.format='preference'), not documents to "
                        "measure a loss on: a DPO run's validation reports their figures (its results.json). To "
                        'evaluate such a run, pass documents (jaxgpt.evaluate --text) or --references.')
    return pipeline.DocumentChunks(self.source(split), lengths, chunk_len)

  def pairs(self, split: str, seq_len: int) -> preference.PairRows:
    """The split's preference pairs that fit rows of `seq_len` tokens (data.format='preference')."""
    return preference.PairRows(self.source(split), self._lengths(split), seq_len)

  def _lengths(self, split: str) -> np.ndarray:
    """Tokens per document; for preference pairs, (prompt, chosen, rejected) tokens per pair."""
    with (paths.path(self.directory) / f'lengths-{split}.npy').open('rb') as f:
      return np.load(f)

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


def cache_directory(data_cfg, tokenizer: Tokenizer | None = None, source: sources.Source | None = None):
  """Where `prepare` keeps the data `data_cfg` names, tokenized by `tokenizer` when one is given."""
  source = source or sources.open_source(data_cfg)
  return paths.path(data_cfg.cache_dir) / f'{data_cfg.source}-{_fingerprint(data_cfg, source, tokenizer)}'


def _stat_or_none(file: str) -> paths.FileStat | None:
  try:
    return paths.stat(file)
  except FileNotFoundError:  # reported by whatever reads it
    return None


def _framed(tokenizer: Tokenizer, texts: list[str]) -> list[dict]:
  return [{'tokens': np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)}
          for ids in tokenizer.encode_batch(texts)]


def _instructions(tokenizer: Tokenizer, texts: list[str]) -> list[dict]:
  return [{'tokens': ids, 'loss_mask': mask} for ids, mask in instructions.encode(tokenizer, texts)]


def _encoding(data_format: str):
  """(encode(tokenizer, texts) -> examples, the examples' features) for a data.format."""
  if data_format == 'preference':
    return preference.encode_pairs, preference.FEATURES
  return (_framed, _TEXT_FEATURES) if data_format == 'text' else (_instructions, _INSTRUCTION_FEATURES)


def _tokenized(texts: Iterator[str], tokenizer: Tokenizer, counts: dict, encode) -> Iterator[dict]:
  for batch in corpus.batched(texts, _ENCODE_BATCH):
    for text, example in zip(batch, encode(tokenizer, batch)):
      token_arrays = [value for name, value in example.items() if value.dtype == np.int32]
      counts['documents'] += 1
      counts['bytes'] += len(instructions.without_markers(text).encode('utf-8'))
      counts['tokens'] += sum(map(len, token_arrays))
      if tokenizer.unk_id is not None:
        counts['unknown'] += sum(int(np.count_nonzero(ids == tokenizer.unk_id)) for ids in token_arrays)
      yield example


def _make_tokenizer(data_cfg, directory: str, log) -> Tokenizer:
  tok_cfg = data_cfg.tokenizer
  start = time.time()
  tokenizer = tokenizer_lib.from_config(tok_cfg)
  if tokenizer is not None:
    log(f'data: loaded a {tokenizer.vocab_size}-piece {tokenizer.kind} tokenizer from {tok_cfg.path}')
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
      ('tokenizer.kind', data_cfg.tokenizer.kind, tokenizer_lib.KINDS),
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
  if data_cfg.tokenizer.kind in ('byte_bpe', 'tiktoken') and not data_cfg.tokenizer.path:
    problems.append(f'data.tokenizer.kind={data_cfg.tokenizer.kind!r} needs data.tokenizer.path (a tokenizer.json '
                    'or vocab/merges directory; a .tiktoken file)')
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
  tokenize into TFDS array_record, and write the report. With data.executor='beam' the cleaning and the tokenizing
  run as Apache Beam pipelines (beam_pipeline.py) with data.beam_args and `pipeline_args` (--runner=..., ...).
  """
  if data_cfg.mixture:  # several sources, each prepared here (jaxgpt/data/mixture.py)
    from jaxgpt.data import mixture  # it imports this module
    return mixture.prepare(data_cfg, log, tokenizer, pipeline_args)
  check_settings(data_cfg)
  source = sources.open_source(data_cfg)
  cache_root = paths.path(data_cfg.cache_dir)
  directory = cache_directory(data_cfg, tokenizer, source)
  if (directory / REPORT_FILE).exists():
    log(f'data: reusing {directory}')
    return _load(directory, reused=True)

  start = time.time()
  tfds.disable_progress_bar()  # our own log lines say what happens; TFDS's bars flood the console
  log(f'data: preparing {source.root} ({data_cfg.source})')
  paths.check_writable(cache_root, 'data.cache_dir')
  if paths.is_remote(directory):
    directory.rmtree(missing_ok=True)  # what a run killed midway left (without its report: never read)
    with tempfile.TemporaryDirectory(prefix='jaxgpt-data-') as building:
      home = str(directory) if data_cfg.executor == 'beam' else None  # Beam's workers write the dataset in place
      report = _build(source, data_cfg, building, log, tokenizer, pipeline_args, home)
      log(f'data: uploading to {directory}')
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


def _build(source: sources.Source, data_cfg, building: str, log, tokenizer: Tokenizer | None, pipeline_args,
           home: str | None = None) -> dict:
  """Builds the cache in the local directory `building`; the TFDS dataset goes in `home` when it is given (Beam's
  workers write a cache in a bucket there: they cannot reach this machine's disk)."""
  home = home or building
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
  start = time.time()
  if data_cfg.executor == 'beam':  # on the workers: the same examples under the same keys
    beam_pipeline.write_tokenized(building, str(paths.path(home) / 'tfds'), tokenizer, data_cfg, counts, pipeline_args)
  else:
    encode, features = _encoding(data_cfg.format)
    documents = {split: _tokenized(corpus.read_clean(building, split), tokenizer, counts[split], encode)
                 for split in SPLITS}
    builder = TokenizedText(documents=documents, features=features, data_dir=os.path.join(building, 'tfds'),
                            file_format='array_record')
    builder.download_and_prepare()
  tokens = sum(c['tokens'] for c in counts.values())
  report.speed['tokens_per_s'] = tokens / max(time.time() - start, 1e-9)

  prepared = PreparedData(home, tokenizer, {})
  for split in SPLITS:  # read back: TFDS stores examples in its own (shuffled) order
    lengths = np.array([preference.lengths(ex) if data_cfg.format == 'preference' else len(ex['tokens'])
                        for ex in prepared.source(split)], np.int64)
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
