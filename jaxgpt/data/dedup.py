"""Exact and near-duplicate removal over the whole corpus, before it is split.

Deduplicating before the train/validation split keeps copies of a training
document out of validation. The first occurrence (in source order) is kept and
named as the original of every later copy, whatever the documents' names, so
the result is deterministic; only kept documents are remembered, so an original
is always a document that is in the dataset. Near duplicates are found with
MinHash LSH (datasketch): documents whose word-shingle sets have an estimated
Jaccard similarity at or above the threshold (docs/data.md, "Near-duplicate
settings", measures what that catches). The index keeps a few bytes per band
per document in memory, which bounds one machine at tens of millions of
documents.
"""

from datasketch import MinHashLSH

from jaxgpt.data.clean import Outcome


class Deduplicator:

  def __init__(self, clean_cfg):
    self._exact = {} if clean_cfg.exact_dedup else None  # text hash -> where it was first seen
    self._lsh = (MinHashLSH(threshold=clean_cfg.near_dedup_threshold, num_perm=clean_cfg.num_perm)
                 if clean_cfg.near_dedup else None)
    self._kept = []  # where each document in the LSH index is, by its index key (arrival order)

  def duplicate_of(self, outcome: Outcome) -> tuple[str, str] | None:
    """(reason, where the original is) if the outcome's text was seen before; else remembers it."""
    where = outcome.record.where
    if self._exact is not None and outcome.exact_key in self._exact:
      return 'exact duplicate', self._exact[outcome.exact_key]
    if self._lsh is not None:
      similar = self._lsh.query(outcome.signature)
      if similar:
        return 'near duplicate', self._kept[min(similar)]  # the earliest similar document
      self._lsh.insert(len(self._kept), outcome.signature)
      self._kept.append(where)
    if self._exact is not None:
      self._exact[outcome.exact_key] = where
    return None
