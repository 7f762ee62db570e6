"""Preference pairs (data.format='preference'): tokenized pairs on disk, and training rows from them.

A pair's cleaned text is its prompt and two marked responses, chosen then
rejected (instructions.render). It is stored as two token sequences sharing
the prompt's tokens, `chosen` and `rejected`, each with its loss mask (1 on
the response, its end marker and the final EOS). The prepared split's
lengths file holds (prompt, chosen, rejected) lengths per pair.

Training reads pairs, not packed rows: each pair gives two rows of seq_len
tokens, in the batch layout of pipeline.py with a leading axis of 2
(chosen, rejected): arrays [pairs, 2, seq_len]. Rows are padded, never
packed with another pair. A pair longer than seq_len + 1 tokens loses the
first tokens of its prompt, as many in both rows; a pair whose responses do
not fit even after one token of prompt is left out. Both are counted.
"""

import grain
import jax
import numpy as np

from jaxgpt.data import instructions, pipeline

# The features of a stored pair: token ids, and 1 on the tokens each response is scored on.
FEATURES = {'chosen': np.int32, 'chosen_mask': np.uint8, 'rejected': np.int32, 'rejected_mask': np.uint8}
_RESPONSES = ('chosen', 'rejected')


def pair_texts(text: str) -> tuple[str, str]:
  """The prompt with the chosen response, and the prompt with the rejected one, each response marked."""
  start, end = instructions.RESPONSE_START, instructions.RESPONSE_END
  prompt, chosen, _, rejected, _ = text.replace(end, start).split(start)
  return prompt + start + chosen + end, prompt + start + rejected + end


def encode_pairs(tokenizer, texts: list[str]) -> list[dict]:
  """The stored examples of preference texts (the prompt's pieces are tokenized alike in both sequences)."""
  encoded = instructions.encode(tokenizer, [t for text in texts for t in pair_texts(text)])
  return [{'chosen': chosen, 'chosen_mask': chosen_mask, 'rejected': rejected, 'rejected_mask': rejected_mask}
          for (chosen, chosen_mask), (rejected, rejected_mask) in zip(encoded[::2], encoded[1::2])]


def lengths(example: dict) -> tuple[int, int, int]:
  """(prompt, chosen, rejected) tokens of a stored pair: the prompt ends where the first scored token starts."""
  return int(np.argmax(example['chosen_mask'] > 0)), len(example['chosen']), len(example['rejected'])


class PairRows:
  """Random access to a split's pairs that fit seq_len, each as its training rows: arrays [2, seq_len]."""

  def __init__(self, pairs, pair_lengths: np.ndarray, seq_len: int):
    self._pairs = pairs
    self._seq_len = seq_len
    prompt, chosen, rejected = np.asarray(pair_lengths, np.int64).reshape(-1, 3).T
    cut = np.maximum(np.maximum(chosen, rejected) - (seq_len + 1), 0)  # prompt tokens to leave out
    fits = prompt - cut >= 1  # one prompt token at least (BOS) before the first scored one
    self._kept, self._cut = np.flatnonzero(fits), cut
    self.truncated = int(np.count_nonzero(fits & (cut > 0)))  # pairs whose prompt lost its first tokens
    self.dropped = int(np.count_nonzero(~fits))  # pairs whose responses alone are longer than a row

  def __len__(self) -> int:
    return len(self._kept)

  def __getitem__(self, index: int) -> dict:
    pair = int(self._kept[index])
    example, cut = self._pairs[pair], int(self._cut[pair])
    rows = [self._row(example[name][cut:], example[f'{name}_mask'][cut:]) for name in _RESPONSES]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def _row(self, ids: np.ndarray, mask: np.ndarray) -> dict:
    """One sequence, padded to seq_len + 1 tokens as a packed row of one document, in the training layout."""
    length, n = self._seq_len + 1, len(ids)
    tokens, loss_mask = np.zeros(length, np.int32), np.zeros(length, np.uint8)
    tokens[:n], loss_mask[:n] = ids, mask
    in_doc = np.arange(length) < n
    return pipeline.to_rows({'tokens': tokens, 'tokens_segment_ids': in_doc.astype(np.int32),
                             'tokens_positions': np.where(in_doc, np.arange(length), 0), 'loss_mask': loss_mask})

  def empty(self) -> dict:
    """A pair of padding rows: nothing scored, so it counts for nothing (fills a last, partial batch)."""
    return {key: np.zeros_like(value) for key, value in self[0].items()}


def make_iterator(pairs: PairRows, *, local_batch_size: int, seed: int, shuffle: bool,
                  process_index: int | None = None, process_count: int | None = None) -> pipeline.BatchIterator:
  """An endless iterator of local batches of pairs: each process reads its own slice of them."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(pairs)[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  return pipeline.BatchIterator(iter(ds.repeat(None).to_iter_dataset().batch(local_batch_size, drop_remainder=True)))
