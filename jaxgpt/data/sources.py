"""Raw text in: the standard library's source, a directory of files, or JSONL.

Documents are split into train and validation by a hash of their key (a file's
relative path, a JSONL line number), so the split does not depend on order and
no file ever lands in both. Every document that cannot be used is counted and
named in a `SkipReport` rather than silently dropped.
"""

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator

from jaxgpt.config import JaxgptError

_EXAMPLES_PER_REASON = 5


@dataclasses.dataclass
class SkipReport:
  """Counts of skipped documents by reason, with a few named examples of each."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def skip(self, reason: str, where: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
      self.examples[reason].append(where)

  def to_dict(self) -> dict:
    return {r: {'count': n, 'examples': self.examples[r]} for r, n in self.counts.items()}

  def summary(self) -> str:
    return ', '.join(f'{n} {r} (e.g. {self.examples[r][0]})' for r, n in self.counts.items())


def _stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def root(data_cfg) -> str:
  return _stdlib_root() if data_cfg.source == 'stdlib' else os.path.expanduser(data_cfg.path)


def document_keys(data_cfg) -> list[str]:
  """All document keys, sorted: relative file paths, or JSONL line numbers."""
  base = root(data_cfg)
  if data_cfg.source == 'jsonl':
    if not os.path.isfile(base):
      raise JaxgptError(f'data.path={base!r} is not a file. Point it at a .jsonl file.')
    with open(base, 'rb') as f:
      keys = [str(i + 1) for i, _ in enumerate(f)]
  else:
    if not os.path.isdir(base):
      raise JaxgptError(f'data.path={base!r} is not a directory. Point it at a directory of text files.')
    pattern = '**/*.py' if data_cfg.source == 'stdlib' else data_cfg.glob
    keys = sorted(
        os.path.relpath(p, base) for p in glob.glob(os.path.join(base, pattern), recursive=True)
        if os.path.isfile(p) and 'site-packages' not in p)
  if data_cfg.max_docs:
    keys = keys[:data_cfg.max_docs]
  if not keys:
    what = f'no lines in {base}' if data_cfg.source == 'jsonl' else f'no files matching {data_cfg.glob!r} under {base}'
    raise JaxgptError(f'no usable text: {what}. Check data.path and data.glob.')
  return keys


def _in_validation(key: str, fraction: float) -> bool:
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < fraction


def split_keys(keys: list[str], val_fraction: float) -> dict[str, list[str]]:
  """Deterministic train/validation split by key; both splits are non-empty."""
  if len(keys) < 2:
    raise JaxgptError(f'only {len(keys)} document found; need at least 2 to hold one out for validation.')
  val = [k for k in keys if _in_validation(k, val_fraction)]
  if not val:  # tiny corpora: hold out the document whose hash is smallest
    val = [min(keys, key=lambda k: hashlib.sha256(k.encode()).digest())]
  held_out = set(val)
  train = [k for k in keys if k not in held_out]
  return {'train': train, 'validation': val}


def _decode(raw: bytes, where: str, data_cfg, report: SkipReport) -> str | None:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    if data_cfg.on_bad_utf8 == 'error':
      raise JaxgptError(
          f'{where} is not valid UTF-8 ({e.reason} at byte {e.start}). Convert it to UTF-8, '
          "remove it, or set data.on_bad_utf8='skip' to skip such documents.") from None
    report.skip('not valid UTF-8', where)
    return None
  text = text.removeprefix('\ufeff')  # a BOM is an encoding marker, not text
  if not text.strip():
    report.skip('empty', where)
    return None
  return text


def read_documents(data_cfg, keys: list[str], report: SkipReport) -> Iterator[str]:
  """Yields the text of each usable document among `keys`, in order."""
  base = root(data_cfg)
  if data_cfg.source != 'jsonl':
    for key in keys:
      path = os.path.join(base, key)
      with open(path, 'rb') as f:
        text = _decode(f.read(), path, data_cfg, report)
      if text is not None:
        yield text
    return
  wanted = set(keys)
  with open(base, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      if str(number) not in wanted:
        continue
      where = f'{base}:{number}'
      line = _decode(raw, where, data_cfg, report)
      if line is None:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        report.skip('invalid JSON', where)
        continue
      text = record.get(data_cfg.text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        report.skip(f'no string field {data_cfg.text_field!r}', where)
      elif not text.strip():
        report.skip('empty', where)
      else:
        yield text
