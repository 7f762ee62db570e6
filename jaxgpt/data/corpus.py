"""The cleaning stage: a source in, `clean-{split}.jsonl` out, every document accounted for.

Records stream from the source through `Cleaner` in worker processes (in
order, a bounded number in flight, so memory does not grow with the corpus),
then through deduplication here, then to the train or validation file by a
hash of their key. The cleaned files are what the tokenizer is trained on and
what the TFDS builder tokenizes; they also let a user read exactly what the
model will see.
"""

import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator

import ml_collections
from tqdm import tqdm

from jaxgpt.config import JaxgptError
from jaxgpt.data import sources
from jaxgpt.data.clean import Cleaner, Outcome
from jaxgpt.data.dedup import Deduplicator
from jaxgpt.data.report import SPLITS, Report

# Records per task sent to a worker, and tasks in flight per worker: enough to
# keep workers busy, few enough that a corpus of huge documents stays in memory bounds.
_RECORDS_PER_TASK = 32
_TASKS_IN_FLIGHT_PER_WORKER = 4

_worker_cleaner = None


def clean_file(directory: str, split: str) -> str:
  return os.path.join(directory, f'clean-{split}.jsonl')


def read_clean(directory: str, split: str) -> Iterator[str]:
  """The cleaned texts of a split, in order, streamed from disk."""
  with open(clean_file(directory, split), encoding='utf-8') as f:
    for line in f:
      yield json.loads(line)['text']


def _start_worker(data_cfg_dict: dict) -> None:
  global _worker_cleaner
  _worker_cleaner = Cleaner(ml_collections.ConfigDict(data_cfg_dict))


def _clean_in_worker(records: list[sources.Record]) -> list[Outcome]:
  return [_worker_cleaner(r) for r in records]


def batched(items: Iterable, size: int) -> Iterator[list]:
  it = iter(items)
  while batch := list(itertools.islice(it, size)):
    yield batch


@contextlib.contextmanager
def _cleaned(records: Iterator[sources.Record], data_cfg, workers: int):
  """Outcomes in source order, from `workers` processes (or this one when workers == 1)."""
  if workers == 1:
    yield map(Cleaner(data_cfg), records)
    return
  # forkserver, not fork: the training process has JAX's threads running, and
  # forking a multithreaded process can deadlock.
  context = multiprocessing.get_context('forkserver')
  with context.Pool(workers, initializer=_start_worker, initargs=(data_cfg.to_dict(),)) as pool:

    def ordered():
      pending = collections.deque()
      for batch in batched(records, _RECORDS_PER_TASK):
        pending.append(pool.apply_async(_clean_in_worker, (batch,)))
        if len(pending) >= workers * _TASKS_IN_FLIGHT_PER_WORKER:
          yield from pending.popleft().get()
      while pending:
        yield from pending.popleft().get()

    yield ordered()


class _SplitWriter:
  """Appends documents to the split files; can move the last train document to validation."""

  def __init__(self, directory: str):
    self._files = {split: open(clean_file(directory, split), 'wb') for split in SPLITS}
    self.counts = collections.Counter()
    self._last_train = (0, b'')  # (offset, line)

  def write(self, split: str, key: str, text: str) -> None:
    line = json.dumps({'key': key, 'text': text}, ensure_ascii=False).encode('utf-8') + b'\n'
    if split == 'train':
      self._last_train = (self._files['train'].tell(), line)
    self._files[split].write(line)
    self.counts[split] += 1

  def ensure_validation(self) -> None:
    """Tiny corpora may hash no document into validation: then it gets the last train document."""
    if self.counts['validation'] == 0 and self.counts['train'] >= 2:
      offset, line = self._last_train
      self._files['train'].seek(offset)
      self._files['train'].truncate()
      self._files['validation'].write(line)
      self.counts.update(train=-1, validation=1)

  def close(self) -> None:
    for f in self._files.values():
      f.close()


def clean_corpus(source: sources.Source, data_cfg, directory: str, report: Report) -> None:
  """Cleans, deduplicates and splits `source` into `directory`, counting everything in `report`."""
  workers = data_cfg.num_workers or os.cpu_count()
  dedup = Deduplicator(data_cfg.clean)
  writer = _SplitWriter(directory)
  start = time.time()
  # disable=None: a bar on a terminal, nothing in logs and tests.
  bar = tqdm(total=source.total_bytes(), unit='B', unit_scale=True, desc='cleaning', disable=None,
             dynamic_ncols=True)
  try:
    with _cleaned(source.records(), data_cfg, workers) as outcomes:
      for outcome in outcomes:
        _account(outcome, dedup, writer, report, data_cfg.val_fraction)
        bar.update(outcome.record.size)
        if report.read['documents'] % 256 == 0:
          bar.set_postfix_str(f'{report.read["documents"] / (time.time() - start):,.0f} docs/s', refresh=False)
    writer.ensure_validation()
  finally:
    bar.close()
    writer.close()
  seconds = max(time.time() - start, 1e-9)
  report.speed.update(workers=workers, clean_seconds=round(seconds, 3),
                      docs_per_s=report.read['documents'] / seconds, mb_per_s=report.read['bytes'] / 1e6 / seconds)
  if writer.counts.total() < 2:
    raise JaxgptError(
        f'no usable text in {source.root}: {writer.counts.total()} of {report.read["documents"]} documents '
        f'survived cleaning; need at least 2, one held out for validation. Dropped: {report.dropped.summary()}. '
        'Check data.path, data.glob, data.text_field, the encoding and the data.clean thresholds.')


def _account(outcome: Outcome, dedup: Deduplicator, writer: _SplitWriter, report: Report,
             val_fraction: float) -> None:
  record = outcome.record
  report.read.update(documents=1, bytes=record.size)
  if not outcome.dropped:
    duplicate = dedup.duplicate_of(outcome)
    if duplicate:
      outcome.dropped, outcome.detail = duplicate[0], f'of {duplicate[1]}'
  if outcome.dropped:
    report.dropped.add(outcome.dropped, record.where, outcome.detail)
    return
  for step, detail in outcome.changes:
    report.changed.add(step, record.where, detail)
  for flag, detail in outcome.flags:
    report.flagged.add(flag, record.where, detail)
  report.kept.update(documents=1, bytes=len(outcome.text.encode('utf-8')))
  split = 'validation' if sources.in_validation(record.key, val_fraction) else 'train'
  writer.write(split, record.key, outcome.text)
