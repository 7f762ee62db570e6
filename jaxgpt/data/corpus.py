"""The cleaning stage: a source in, `clean-{split}.jsonl` out, every document accounted for.

Records stream from the source through `Cleaner` in worker processes (in
order, a bounded number in flight, so memory does not grow with the corpus),
then through exact deduplication; what survives goes to a file on disk while
its MinHash signature stays for the near-duplicate search (dedup.py), which is
resolved once every document is in. `write_kept` then streams the survivors
back, in source order, to the train or validation file by a hash of their key.
The Beam executor (beam_pipeline.py) ends with the same `write_kept`. The
cleaned files are what the tokenizer is trained on and what the TFDS builder
tokenizes; they also let a user read exactly what the model will see.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import pickle
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
# Exact dedup's survivors, in source order, while the near-duplicate groups are not known yet.
_SURVIVORS_FILE = 'survivors.pickle'

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
  # forking a multithreaded process can deadlock. An executor, not a Pool: a worker
  # that dies (killed for memory, say) fails the futures instead of hanging the run.
  context = multiprocessing.get_context('forkserver')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                              initargs=(data_cfg.to_dict(),)) as pool:

    def result(future) -> list[Outcome]:
      try:
        return future.result()
      except concurrent.futures.process.BrokenProcessPool as e:
        raise JaxgptError(f'a data cleaning worker process died ({e}); the machine may be out of memory. '
                          'Lower data.num_workers, or free memory, and run again.') from e

    def ordered():
      pending = collections.deque()
      for batch in batched(records, _RECORDS_PER_TASK):
        pending.append(pool.submit(_clean_in_worker, batch))
        if len(pending) >= workers * _TASKS_IN_FLIGHT_PER_WORKER:
          yield from result(pending.popleft())
      while pending:
        yield from result(pending.popleft())

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


@dataclasses.dataclass
class Survivor:
  """A document exact dedup kept; `near_original` names its near-duplicate group's kept document, unless it is it."""
  order: int  # its position in the source's stream
  key: str
  where: str
  text: str
  changes: list  # (step, detail)
  flags: list  # (flag, detail)
  near_original: str | None = None

  @classmethod
  def of(cls, order: int, outcome: Outcome) -> 'Survivor':
    record = outcome.record
    return cls(order, record.key, record.where, outcome.text, outcome.changes, outcome.flags)


def clean_corpus(source: sources.Source, data_cfg, directory: str, report: Report) -> None:
  """Cleans, deduplicates and splits `source` into `directory`, counting everything in `report`."""
  workers = data_cfg.num_workers or os.cpu_count()
  dedup = Deduplicator(data_cfg.clean)
  survivors = os.path.join(directory, _SURVIVORS_FILE)
  start = time.time()
  # disable=None: a bar on a terminal, nothing in logs and tests.
  bar = tqdm(total=source.total_bytes(), unit='B', unit_scale=True, desc='cleaning', disable=None,
             dynamic_ncols=True)
  try:
    with _cleaned(source.records(), data_cfg, workers) as outcomes, open(survivors, 'wb') as spill:
      for order, outcome in enumerate(outcomes):
        _account(order, outcome, dedup, spill, report)
        bar.update(outcome.record.size)
        if report.read['documents'] % 256 == 0:
          bar.set_postfix_str(f'{report.read["documents"] / (time.time() - start):,.0f} docs/s', refresh=False)
  finally:
    bar.close()
  near_originals = dedup.near_originals()
  write_kept(_read_survivors(survivors, near_originals), data_cfg, directory, report, source.root)
  os.remove(survivors)
  seconds = max(time.time() - start, 1e-9)
  report.speed.update(workers=workers, clean_seconds=round(seconds, 3),
                      docs_per_s=report.read['documents'] / seconds, mb_per_s=report.read['bytes'] / 1e6 / seconds)


def _account(order: int, outcome: Outcome, dedup: Deduplicator, spill, report: Report) -> None:
  record = outcome.record
  report.read.update(documents=1, bytes=record.size)
  if not outcome.dropped:
    original = dedup.exact_original(order, outcome)
    if original:
      outcome.dropped, outcome.detail = 'exact duplicate', f'of {original}'
  if outcome.dropped:
    report.dropped.add(outcome.dropped, record.where, outcome.detail)
  else:
    pickle.dump(Survivor.of(order, outcome), spill)


def _read_survivors(file: str, near_originals: dict[int, str]) -> Iterator[Survivor]:
  with open(file, 'rb') as f:
    while True:
      try:
        survivor = pickle.load(f)
      except EOFError:
        return
      survivor.near_original = near_originals.get(survivor.order)
      yield survivor


def write_kept(survivors: Iterable[Survivor], data_cfg, directory: str, report: Report, root: str) -> None:
  """Writes the survivors (in source order) that are no near duplicate to their split files, counting each."""
  writer = _SplitWriter(directory)
  try:
    for s in survivors:
      if s.near_original:
        report.dropped.add('near duplicate', s.where, f'of {s.near_original}')
        continue
      for step, detail in s.changes:
        report.changed.add(step, s.where, detail)
      for flag, detail in s.flags:
        report.flagged.add(flag, s.where, detail)
      report.kept.update(documents=1, bytes=len(s.text.encode('utf-8')))
      writer.write('validation' if sources.in_validation(s.key, data_cfg.val_fraction) else 'train', s.key, s.text)
    writer.ensure_validation()
  finally:
    writer.close()
  if writer.counts.total() < 2:
    raise JaxgptError(
        f'no usable text in {root}: {writer.counts.total()} of {report.read["documents"]} documents '
        f'survived cleaning; need at least 2, one held out for validation. Dropped: {report.dropped.summary()}. '
        'Check data.path, data.glob, data.text_field, the encoding and the data.clean thresholds.')
