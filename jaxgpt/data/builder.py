"""Raw text -> tokenizer + tokenized TFDS dataset (array_record), cached on disk.

`prepare` is idempotent: the cache directory's name is a fingerprint of the
data settings and of the source files' sizes and modification times, so a
second run reuses the tokenizer and dataset, and changed input rebuilds them.
The directory is built under a temporary name and renamed when complete, so a
crash never leaves a half-written cache that a later run would trust.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxgpt.config import JaxgptError
from jaxgpt.data import pipeline, sources
from jaxgpt.data.tokenizer import Tokenizer, train_tokenizer

# Bump when the on-disk layout or tokenization changes, to invalidate old caches.
_FORMAT_VERSION = 2
_SPLITS = ('train', 'validation')
_ENCODE_BATCH = 64
TOKENIZER_FILE = 'tokenizer.model'
REPORT_FILE = 'report.json'


class TokenizedText(tfds.core.GeneratorBasedBuilder):
  """One example per document: its token ids, framed by BOS and EOS."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, documents=None, **kwargs):
    self._documents = documents  # split name -> iterator of token arrays; only when preparing
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(docs) for split, docs in self._documents.items()}

  def _generate_examples(self, docs):
    for i, tokens in enumerate(docs):
      yield i, {'tokens': tokens}


@dataclasses.dataclass
class PreparedData:
  directory: str
  tokenizer: Tokenizer
  report: dict

  def source(self, split: str):
    """A random-access source of {'tokens': int32 array} for Grain, one per document."""
    return tfds.builder_from_directory(self._tfds_dir()).as_data_source(split)

  def chunks(self, split: str, chunk_len: int) -> pipeline.DocumentChunks:
    """The split as pieces of at most `chunk_len` tokens, the unit that training shuffles."""
    lengths = np.load(os.path.join(self.directory, f'lengths-{split}.npy'))
    return pipeline.DocumentChunks(self.source(split), lengths, chunk_len)

  def _tfds_dir(self) -> str:
    return os.path.join(self.directory, 'tfds', 'tokenized_text', str(TokenizedText.VERSION))


def _fingerprint(data_cfg, keys: list[str]) -> str:
  root = sources.root(data_cfg)
  paths = [root] if data_cfg.source == 'jsonl' else [os.path.join(root, k) for k in keys]
  stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  settings = {k: data_cfg[k] for k in ('source', 'glob', 'text_field', 'max_docs',
                                       'val_fraction', 'on_bad_utf8', 'vocab_size')}
  blob = json.dumps([_FORMAT_VERSION, root, settings, stats], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _tokenized(texts: Iterator[str], tokenizer: Tokenizer, counts: dict) -> Iterator[np.ndarray]:
  def flush(batch):
    for text, ids in zip(batch, tokenizer.encode_batch(batch)):
      counts['documents'] += 1
      counts['bytes'] += len(text.encode('utf-8'))
      counts['tokens'] += len(ids) + 2
      yield np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)

  batch = []
  for text in texts:
    batch.append(text)
    if len(batch) == _ENCODE_BATCH:
      yield from flush(batch)
      batch = []
  yield from flush(batch)


def prepare(data_cfg, log=print) -> PreparedData:
  """Returns the cached tokenizer and dataset for `data_cfg`, building them if needed."""
  keys = sources.document_keys(data_cfg)
  cache_root = os.path.expanduser(data_cfg.cache_dir)
  directory = os.path.join(cache_root, f'{data_cfg.source}-{_fingerprint(data_cfg, keys)}')
  if os.path.isfile(os.path.join(directory, REPORT_FILE)):
    with open(os.path.join(directory, REPORT_FILE)) as f:
      report = json.load(f)
    log(f'data: reusing {directory}')
    return PreparedData(directory, Tokenizer.load(os.path.join(directory, TOKENIZER_FILE)), report)

  start = time.time()
  tfds.disable_progress_bar()  # our own log lines say what happens; TFDS's bars flood the console
  split_keys = sources.split_keys(keys, data_cfg.val_fraction)
  log(f'data: preparing {len(keys)} documents from {sources.root(data_cfg)} '
      f'({len(split_keys["train"])} train, {len(split_keys["validation"])} validation)')
  try:
    os.makedirs(cache_root, exist_ok=True)
  except OSError as e:
    raise JaxgptError(f'cannot create data.cache_dir={cache_root!r} ({e}). Choose a writable directory.') from None
  building = f'{directory}.building-{os.getpid()}'
  shutil.rmtree(building, ignore_errors=True)
  os.makedirs(building)

  skipped = {split: sources.SkipReport() for split in _SPLITS}
  tokenizer = train_tokenizer(_training_texts(data_cfg, split_keys['train']), data_cfg.vocab_size)
  tokenizer.save(os.path.join(building, TOKENIZER_FILE))
  log(f'data: trained a {tokenizer.vocab_size}-piece BPE tokenizer in {time.time() - start:.1f}s')

  counts = {split: {'documents': 0, 'bytes': 0, 'tokens': 0} for split in _SPLITS}
  documents = {
      split: _tokenized(sources.read_documents(data_cfg, split_keys[split], skipped[split]),
                        tokenizer, counts[split])
      for split in _SPLITS}
  builder = TokenizedText(documents=documents, data_dir=os.path.join(building, 'tfds'),
                          file_format='array_record')
  builder.download_and_prepare()
  for split in _SPLITS:
    if counts[split]['documents'] == 0:
      shutil.rmtree(building, ignore_errors=True)
      raise JaxgptError(f'the {split} split has no usable documents ({skipped[split].summary()}). '
                        'Add more text or lower data.val_fraction.')

  prepared = PreparedData(building, tokenizer, {})
  for split in _SPLITS:  # read back: TFDS stores examples in its own (shuffled) order
    lengths = np.array([len(ex['tokens']) for ex in prepared.source(split)], np.int64)
    np.save(os.path.join(building, f'lengths-{split}.npy'), lengths)
  report = {split: {**counts[split], 'skipped': skipped[split].to_dict()} for split in _SPLITS}
  report['tokenizer'] = {'vocab_size': tokenizer.vocab_size, 'fingerprint': tokenizer.fingerprint,
                         'bytes_per_token': counts['train']['bytes'] / max(1, counts['train']['tokens'])}
  with open(os.path.join(building, REPORT_FILE), 'w') as f:
    json.dump(report, f, indent=2)
  shutil.rmtree(directory, ignore_errors=True)
  os.rename(building, directory)
  for split in _SPLITS:
    c = counts[split]
    note = f'; skipped {skipped[split].summary()}' if skipped[split].counts else ''
    log(f'data: {split}: {c["documents"]} documents, {c["bytes"] / 1e6:.1f} MB, '
        f'{c["tokens"] / 1e6:.2f}M tokens{note}')
  log(f'data: ready in {time.time() - start:.1f}s at {directory}')
  return PreparedData(directory, tokenizer, report)


def _training_texts(data_cfg, train_keys: list[str]) -> Iterator[str]:
  """The train split's texts, failing clearly before training if there are none."""
  skipped = sources.SkipReport()
  texts = sources.read_documents(data_cfg, train_keys, skipped)
  first = next(texts, None)
  if first is None:
    raise JaxgptError(
        f'no usable text in {sources.root(data_cfg)}: all {len(train_keys)} training documents were '
        f'skipped ({skipped.summary()}). Check data.path, data.glob, data.text_field and the encoding.')
  return itertools.chain([first], texts)
