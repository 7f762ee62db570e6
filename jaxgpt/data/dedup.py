"""Exact and near-duplicate removal over the whole corpus, before it is split.

Deduplicating before the train/validation split keeps copies of a training
document out of validation. The first occurrence (in source order) is kept, so
the result is deterministic. Near duplicates are found with MinHash LSH
(datasketch): documents whose word-shingle sets have an estimated Jaccard
similarity at or above the threshold. The index keeps a few bytes per band per
document in memory, which bounds one machine at tens of millions of documents.
"""

from datasketch import MinHashLSH

from jaxgpt.data.clean import Outcome


class Deduplicator:

  def __init__(self, clean_cfg):
    self._exact = {} if clean_cfg.exact_dedup else None  # text hash -> where it was first seen
    self._lsh = (MinHashLSH(threshold=clean_cfg.near_dedup_threshold, num_perm=clean_cfg.num_perm)
                 if clean_cfg.near_dedup else None)

  def duplicate_of(self, outcome: Outcome) -> tuple[str, str] | None:
    """(reason, where the original is) if the outcome's text was seen before; else remembers it."""
    where = outcome.record.where
    if self._exact is not None:
      original = self._exact.setdefault(outcome.exact_key, where)
      if original != where:
        return 'exact duplicate', original
    if self._lsh is not None:
      similar = self._lsh.query(outcome.signature)
      if similar:
        return 'near duplicate', min(similar)
      self._lsh.insert(where, outcome.signature)
    return None
