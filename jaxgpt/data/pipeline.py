"""Grain input pipeline: tokenized documents -> packed, batched training rows.

The batch layout is the only thing data shares with training: a dict of int32
arrays [rows, seq_len]:
  inputs, targets        next-token pairs
  segment_ids            1, 2, ... per packed document, 0 for padding
  positions              position inside each document (restarts at 0)
  loss_mask              1 where the target belongs to the same document (and, for
                         instruction data, is a response token)
Preference pairs (data/preference.py) take the same layout with an axis for
the pair's two rows: [pairs, 2, seq_len], chosen first.

Each JAX process reads only its own slice of the documents, so the rows one
process yields are that process's share of the global batch. The iterator is
a Grain DatasetIterator: its state is saved with every checkpoint. Several
sources (a `Mixture`) are packed one by one and mixed row by row by weight.
"""

import dataclasses
import functools
import json
from collections.abc import Sequence

import grain
import jax
import numpy as np

# What an example may hold: token ids, and for instruction data a per-token loss mask packed with them.
_FEATURES = ('tokens', 'loss_mask')


def to_rows(packed: dict) -> dict:
  """Turns one packed row of seq_len + 1 tokens into the training layout."""
  tokens, seg, pos = packed['tokens'], packed['tokens_segment_ids'], packed['tokens_positions']
  same_doc = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
  if 'loss_mask' in packed:  # instruction data: only the responses' tokens are targets
    same_doc &= packed['loss_mask'][1:] > 0
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'segment_ids': seg[:-1].astype(np.int32),
      'positions': pos[:-1].astype(np.int32),
      'loss_mask': same_doc.astype(np.int32),
  }


class DocumentChunks:
  """Random access to documents cut into pieces of at most `chunk_len` tokens.

  Shuffling whole documents would fill a batch with consecutive rows of one
  long file; shuffling chunks mixes many documents into every batch.
  """

  def __init__(self, documents, lengths: np.ndarray, chunk_len: int):
    self._documents = documents
    self._chunk_len = chunk_len
    per_doc = -(-lengths // chunk_len)  # ceil
    self._doc_of_chunk = np.repeat(np.arange(len(lengths)), per_doc)
    self._first_chunk = np.concatenate([[0], np.cumsum(per_doc)[:-1]])

  def __len__(self) -> int:
    return len(self._doc_of_chunk)

  def __getitem__(self, index: int) -> dict:
    doc = int(self._doc_of_chunk[index])
    start = (index - int(self._first_chunk[doc])) * self._chunk_len
    example = self._documents[doc]
    return {k: np.asarray(example[k][start:start + self._chunk_len]) for k in _FEATURES if k in example}


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Several random-access sources, each packed into rows on its own, mixed row by row by weight.

  Rows, not documents, are mixed: every row holds seq_len + 1 tokens, so each
  source's share of the rows is its share of the tokens trained on, whatever
  its documents' lengths (mixing documents would favour the source with the
  longer ones).
  """
  sources: dict  # name -> random-access source (documents or DocumentChunks)
  weights: dict  # name -> weight, any positive scale


def make_iterator(source, *, seq_len: int, local_batch_size: int, seed: int,
                  shuffle: bool, process_index: int | None = None,
                  process_count: int | None = None) -> 'BatchIterator':
  """An endless iterator of local batches from a random-access `source`, or from a `Mixture` of them.

  Elements (documents or DocumentChunks) are concatenated and split into rows
  of seq_len + 1 tokens (concat-then-split packing: no padding; an element
  that does not fit continues on the next row), then shifted into
  input/target pairs. A mixture's rows come from its sources in the
  proportions of their weights (Grain's mix: a fixed interleaving whose every
  cycle, 1,000 rows for 0.7/0.2/0.1, holds each source's share exactly), each
  source shuffled by its own seed; batches then leave out the rows' source,
  which BatchIterator counts.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  rows_of = lambda src, seed: _rows(src, seq_len, seed, shuffle, process_index, process_count)
  if not isinstance(source, Mixture):
    return BatchIterator(iter(rows_of(source, seed).batch(local_batch_size, drop_remainder=True)))
  names = sorted(source.sources)
  streams = {name: rows_of(source.sources[name], _source_seed(seed, i)).map(functools.partial(_tagged, i))
             for i, name in enumerate(names)}
  smallest = min(source.weights.values())
  # Whole numbers, which grain's mix keeps as they are (it truncates the ratios of fractional ones).
  proportions = {name: round(100 * source.weights[name] / smallest) for name in names}
  rows = grain.IterDataset.mix(streams, proportions)
  return BatchIterator(iter(rows.batch(local_batch_size, drop_remainder=True)), names)


def _rows(source, seq_len: int, seed: int, shuffle: bool, process_index: int, process_count: int):
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  features = [k for k in _FEATURES if k in source[0]]
  ds = ds.repeat(None).map(lambda example: {k: example[k] for k in features})
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={k: seq_len + 1 for k in features})
  return packed.map(to_rows)


def _source_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence((seed, index)).generate_state(1)[0])


def _tagged(index: int, row: dict) -> dict:
  return {**row, 'source': np.int32(index)}


class BatchIterator:
  """The pipeline's iterator; `grain.checkpoint.CheckpointSave` stores its state.

  It serialises its state itself because a plain JSON round trip turns the
  packer's (start, stop) tuples into lists, and ConcatThenSplit (grain 0.2.18)
  then resumes at the wrong place. For a mixture it takes each row's source
  off the batch (the step does not need it) and counts the tokens each source
  gave, saved with the position so that a resumed run's counts continue.
  """

  def __init__(self, iterator: grain.DatasetIterator, source_names: Sequence[str] = ()):
    self._iterator = iterator
    self.source_names = tuple(source_names)
    self._source_tokens = np.zeros(len(self.source_names), np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    if self.source_names:
      batch = dict(batch)
      np.add.at(self._source_tokens, batch.pop('source'), (batch['segment_ids'] > 0).sum(axis=1))
    return batch

  @property
  def source_tokens(self) -> dict[str, int]:
    """A mixture's input tokens yielded so far by source (this process's rows); empty for one source."""
    return dict(zip(self.source_names, self._source_tokens.tolist()))

  def get_state(self) -> bytes:
    state = self._iterator.get_state()
    if self.source_names:
      state = {'rows': state, 'source_tokens': self.source_tokens}
    return json.dumps(state, indent=1).encode()

  def set_state(self, state: str | bytes) -> None:
    state = json.loads(state)
    if self.source_names:
      counts = state['source_tokens']
      self._source_tokens[:] = [counts.get(name, 0) for name in self.source_names]
      state = state['rows']
    self._iterator.set_state(_with_slice_tuples(state))

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore."""
    self._iterator.start_prefetch()


def _with_slice_tuples(state):
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == 'remainder_slices' else _with_slice_tuples(s))
            for k, s in state.items()}
  return state


def random_batch(rows: int, seq_len: int, vocab_size: int, seed: int) -> dict:
  """A batch of uniformly random tokens in the training layout, one document per row.

  For benchmarks and tests that measure the step, not the data.
  """
  tokens = np.random.default_rng(seed).integers(3, vocab_size, (rows, seq_len + 1)).astype(np.int32)
  ones = np.ones((rows, seq_len), np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': ones,
          'positions': np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)), 'loss_mask': ones}
