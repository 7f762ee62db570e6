"""Exact and near-duplicate removal over the whole corpus, before it is split: one rule, two executors.

Deduplicating before the train/validation split keeps copies of a training
document out of validation. Every document has an order, its position in the
source's stream (a file's place in the sorted file list, a JSONL line's
number, a TFDS index), which a distributed reader knows as well as a
streaming one; the earliest copy is kept, whatever the documents' names.

Exact: documents with the same `clean.exact_key` keep the earliest; the rest
are dropped as exact duplicates of it. Near, among what exact dedup kept: two
documents are linked when their MinHash signatures agree on one of the LSH
bands datasketch's `MinHashLSH` picks for the threshold and `num_perm`, and
their estimated Jaccard similarity is at least the threshold. Every connected
group of linked documents keeps its earliest one and drops the others as near
duplicates of it, so in a chain A~B~C where A and C are not alike, B and C both
go. That needs the whole corpus, which Beam cannot stream in order, so both
executors resolve groups after the last document: `corpus.py` in one process
with `Deduplicator`, `beam_pipeline.py` with a GroupByKey per band; both call
`band_keys`, `bucket_links` and `keepers`. docs/data.md ("Near-duplicate
settings") measures what this catches.
"""

import collections
import functools
import hashlib
from collections.abc import Hashable, Iterable

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from jaxgpt.data.clean import Outcome


@functools.lru_cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band): datasketch's choice, which weighs missed and false candidates equally."""
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


def signature_values(signature: LeanMinHash) -> np.ndarray:
  """The signature as uint32 (datasketch's hash values are below 2**32): half the memory of its uint64."""
  return signature.hashvalues.astype(np.uint32)


def band_keys(values: np.ndarray, bands: int, rows: int) -> list[bytes]:
  """One key per band; two documents are candidates when any key is equal."""
  return [i.to_bytes(2, 'big') + hashlib.blake2b(values[i * rows:(i + 1) * rows].tobytes(), digest_size=8).digest()
          for i in range(bands)]


def bucket_links(members: list[tuple[Hashable, np.ndarray]], threshold: float) -> list[tuple]:
  """The linked pairs among the documents sharing one band key, as a spanning forest: as many pairs as needed to
  connect what is linked (fewer than len(members)), however many of the documents are alike."""
  members = sorted(members, key=lambda m: m[0])
  values = np.stack([v for _, v in members])
  forest = _Forest()
  links = []
  for i in range(len(members) - 1):
    similar = np.count_nonzero(values[i + 1:] == values[i], axis=1) / values.shape[1] >= threshold
    for j in np.flatnonzero(similar) + i + 1:
      if forest.union(members[i][0], members[j][0]):
        links.append((members[i][0], members[j][0]))
  return links


def keepers(links: Iterable[tuple]) -> dict:
  """document -> the earliest document of its connected group, for every linked document but that earliest."""
  forest = _Forest()
  for a, b in links:
    forest.union(a, b)
  return {node: root for node in list(forest.parent) if (root := forest.find(node)) != node}


class _Forest:
  """Union-find whose root is the smallest member of its group."""

  def __init__(self):
    self.parent = {}

  def find(self, node):
    parent = self.parent.setdefault(node, node)
    while parent != node:
      grandparent = self.parent[parent]
      self.parent[node] = grandparent  # path halving keeps the trees shallow
      node, parent = parent, grandparent
    return node

  def union(self, a, b) -> bool:
    """Joins the groups of a and b; False when they were one already."""
    a, b = self.find(a), self.find(b)
    if a == b:
      return False
    self.parent[max(a, b)] = min(a, b)
    return True


class Deduplicator:
  """The rule in one process: `exact_original` per document in source order, then `near_originals` at the end.

  It holds 16 bytes and a name per exactly distinct document, and a signature (num_perm x 4 bytes) and its band
  keys per document in the near-duplicate search; never the texts.
  """

  def __init__(self, clean_cfg):
    self._exact = {} if clean_cfg.exact_dedup else None  # text hash -> where its earliest copy is
    self._near = clean_cfg.near_dedup
    self._threshold = clean_cfg.near_dedup_threshold
    self._bands = lsh_bands(clean_cfg.near_dedup_threshold, clean_cfg.num_perm)
    self._signatures = {}  # (order, where) -> signature values
    self._buckets = collections.defaultdict(list)  # band key -> (order, where) of the documents with it

  def exact_original(self, order: int, outcome: Outcome) -> str | None:
    """Where the earlier exact copy of the outcome's text is; None (and it is remembered) when it is the first."""
    if self._exact is not None:
      if outcome.exact_key in self._exact:
        return self._exact[outcome.exact_key]
      self._exact[outcome.exact_key] = outcome.record.where
    if self._near:
      node = (order, outcome.record.where)
      self._signatures[node] = values = signature_values(outcome.signature)
      for key in band_keys(values, *self._bands):
        self._buckets[key].append(node)
    return None

  def near_originals(self) -> dict[int, str]:
    """order -> where its group's kept document is, for every near duplicate among the documents remembered."""
    links = (link for nodes in self._buckets.values() if len(nodes) > 1
             for link in bucket_links([(n, self._signatures[n]) for n in nodes], self._threshold))
    return {order: where for (order, _), (_, where) in keepers(links).items()}
