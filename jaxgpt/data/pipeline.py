"""Grain input pipeline: tokenized documents -> packed, batched training rows.

The batch layout is the only thing data shares with training: a dict of int32
arrays [rows, seq_len]:
  inputs, targets        next-token pairs
  segment_ids            1, 2, ... per packed document, 0 for padding
  positions              position inside each document (restarts at 0)
  loss_mask              1 where the target belongs to the same document

Each JAX process reads only its own slice of the documents, so the rows one
process yields are that process's share of the global batch. The iterator is
a Grain DatasetIterator: its state is saved with every checkpoint.
"""

import grain
import jax
import numpy as np


def _to_rows(packed: dict) -> dict:
  """Turns one packed row of seq_len + 1 tokens into the training layout."""
  tokens, seg, pos = packed['tokens'], packed['tokens_segment_ids'], packed['tokens_positions']
  same_doc = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'segment_ids': seg[:-1].astype(np.int32),
      'positions': pos[:-1].astype(np.int32),
      'loss_mask': same_doc.astype(np.int32),
  }


def make_iterator(source, *, seq_len: int, local_batch_size: int, seed: int,
                  shuffle: bool, process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
  """An endless iterator of local batches from a random-access `source`.

  Documents are concatenated and split into rows of seq_len + 1 tokens
  (concat-then-split packing: no padding, long documents continue on the next
  row), then shifted into input/target pairs.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  ds = ds.repeat(None).map(lambda example: {'tokens': example['tokens']})
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={'tokens': seq_len + 1})
  return iter(packed.map(_to_rows).batch(local_batch_size, drop_remainder=True))
