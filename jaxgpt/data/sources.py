"""Raw documents in: the standard library's source, a directory tree, JSONL, or a TFDS dataset.

A source is streamed as `Record`s (a key, a place to name in reports, the raw
payload); `extract_text` turns one record into text or says why it cannot be
used (not UTF-8, invalid JSON, a missing or empty field, ...), with the line
number. Records are never all in memory; a directory's file list is.

Documents are split into train and validation by a hash of their key (a file's
relative path; a JSONL record's `data.id_field` value, or when it has none a hash
of the line's content; a TFDS index), so the split does not depend on order:
inserting, deleting or moving a line of a JSONL file moves no other document
between the splits. No document ever lands in both.
"""

import dataclasses
import fnmatch
import hashlib
import json
import sysconfig
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data.instructions import render, string_field

SOURCES = ('stdlib', 'dir', 'jsonl', 'tfds')


@dataclasses.dataclass(frozen=True)
class Record:
  key: str  # stable identity: decides the split
  where: str  # what reports name: a path, path:line or dataset[index]
  size: int  # raw bytes, for progress and the report
  payload: bytes | str  # a file's path or URL (read by the worker), or the raw bytes


@dataclasses.dataclass(frozen=True)
class Extracted:
  text: str | None  # None: unusable, for `reason`
  reason: str = ''
  detail: str = ''
  repaired: bool = False  # undecodable bytes were replaced (on_bad_utf8='repair')


class Source:
  """A stream of records, with what the cache fingerprint must cover."""

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.root = root(data_cfg)

  def records(self) -> Iterator[Record]:
    raise NotImplementedError

  def total_bytes(self) -> int | None:
    """For the progress bar's ETA; None when unknown in advance."""
    return None

  def identity(self) -> list:
    """What changes when the input changes (paths, sizes, modification times)."""
    raise NotImplementedError


def root(data_cfg) -> str:
  if data_cfg.source == 'stdlib':
    return sysconfig.get_paths()['stdlib']
  return paths.expand(data_cfg.path)


def _patterns(value: str) -> list[str]:
  return [p.strip() for p in value.split(',') if p.strip()]


class FileTree(Source):
  """Every file under `root` (a local directory or a bucket's) matching an include glob and no exclude glob,
  in sorted order."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    if not paths.path(self.root).is_dir():
      raise JaxgptError(f'data.path={self.root!r} is not a directory. Point it at a directory of text files.')
    stdlib = data_cfg.source == 'stdlib'
    include = ['**/*.py'] if stdlib else _patterns(data_cfg.glob)
    exclude = _patterns(data_cfg.exclude) + (['site-packages/**'] if stdlib else [])
    files = {}
    for pattern in include:
      files.update((key, stat) for key, stat in paths.glob_files(self.root, pattern).items()
                   if not any(fnmatch.fnmatch(key, x) for x in exclude))
    self.keys = sorted(files)[:data_cfg.max_docs or None]
    if not self.keys:
      raise JaxgptError(f'no usable text: no files matching {data_cfg.glob!r} (excluding '
                        f'{data_cfg.exclude!r}) under {self.root}. Check data.path, data.glob and data.exclude.')
    self._stats = [files[k] for k in self.keys]

  def records(self) -> Iterator[Record]:
    for key, stat in zip(self.keys, self._stats):
      path = f'{self.root.rstrip("/")}/{key}'
      yield Record(key, path, stat.size, path)

  def total_bytes(self) -> int:
    return sum(s.size for s in self._stats)

  def identity(self) -> list:
    return [(k, s.size, s.mtime_ns) for k, s in zip(self.keys, self._stats)]


class JsonLines(Source):
  """One document per line of a JSONL file (local or in a bucket), keyed by content (`jsonl_key`); reports name
  path:line."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    if not paths.path(self.root).is_file():
      raise JaxgptError(f'data.path={self.root!r} is not a file. Point it at a .jsonl file.')
    self._stat = paths.stat(self.root)

  def records(self) -> Iterator[Record]:
    with paths.path(self.root).open('rb') as f:
      for number, line in enumerate(f, start=1):
        if self.cfg.max_docs and number > self.cfg.max_docs:
          return
        yield Record(jsonl_key(line, self.cfg.id_field), f'{self.root}:{number}', len(line), line)

  def total_bytes(self) -> int:
    return self._stat.size

  def identity(self) -> list:
    return [(self.root, self._stat.size, self._stat.mtime_ns)]


class TfdsDataset(Source):
  """One split of a TFDS dataset prepared as array_record (read without TensorFlow)."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    import tensorflow_datasets as tfds  # slow to import: only for this source
    data_dir = self.root or None
    try:
      self._builder = tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
      self._examples = self._builder.as_data_source(split=data_cfg.tfds_split)
    except Exception as e:  # TFDS raises many kinds: not found, not prepared, wrong format
      raise JaxgptError(
          f'cannot read TFDS dataset data.tfds_name={data_cfg.tfds_name!r} split {data_cfg.tfds_split!r} '
          f'from data.path={self.root or "(TFDS default)"!r} ({type(e).__name__}: {str(e)[:300]}). It must be '
          'prepared in array_record format, e.g. `tfds build NAME --file_format=array_record`.') from None
    if data_cfg.text_field not in self._builder.info.features:
      raise JaxgptError(f'the TFDS dataset {data_cfg.tfds_name!r} has no feature {data_cfg.text_field!r} '
                        f'(it has {", ".join(self._builder.info.features)}); set data.text_field.')
    self._count = min(len(self._examples), data_cfg.max_docs or len(self._examples))

  def records(self) -> Iterator[Record]:
    name = f'{self.cfg.tfds_name}/{self.cfg.tfds_split}'
    for index in range(self._count):
      value = self._examples[index][self.cfg.text_field]
      payload = value if isinstance(value, bytes) else str(value).encode('utf-8')
      yield Record(str(index), f'{name}[{index}]', len(payload), payload)

  def identity(self) -> list:
    return [self._builder.info.full_name, self._builder.data_dir, self.cfg.tfds_split, self._count]


def open_source(data_cfg) -> Source:
  kinds = {'stdlib': FileTree, 'dir': FileTree, 'jsonl': JsonLines, 'tfds': TfdsDataset}
  return kinds[data_cfg.source](data_cfg)


def jsonl_key(line: bytes, id_field: str) -> str:
  """A JSONL record's identity, whatever line it is on: 'id:' and its `id_field` value when the record
  has one (a non-empty string or an integer), else 'sha256:' and a hash of the line without surrounding
  whitespace.

  An id keeps a record in its split when its text is edited (ids are expected to be unique: records
  sharing one share a split); without one, identical lines share a key, and deduplication keeps one of
  them. The line is parsed here, in the reading process, only when the field's quoted name occurs in it.
  """
  if id_field and f'"{id_field}"'.encode() in line:
    try:
      record = json.loads(line)
    except (ValueError, RecursionError):  # invalid JSON or UTF-8: dropped later, keyed by content meanwhile
      record = None
    value = record.get(id_field) if isinstance(record, dict) else None
    if (isinstance(value, str) and value) or (isinstance(value, int) and not isinstance(value, bool)):
      return f'id:{json.dumps(value, ensure_ascii=False)}'
  return f'sha256:{hashlib.sha256(line.strip()).hexdigest()[:32]}'


def in_validation(key: str, fraction: float) -> bool:
  """Whether the document with `key` is held out; a pure function of the key."""
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < fraction


def _decode(raw: bytes, where: str, on_bad_utf8: str) -> Extracted:
  try:
    return Extracted(raw.decode('utf-8'))
  except UnicodeDecodeError as e:
    detail = f'{e.reason} at byte {e.start}'
    if on_bad_utf8 == 'error':
      raise JaxgptError(
          f'{where} is not valid UTF-8 ({detail}). Convert it to UTF-8, remove it, or set '
          "data.on_bad_utf8='skip' (or 'repair') to skip (or repair) such documents.") from None
    if on_bad_utf8 == 'repair':
      return Extracted(raw.decode('utf-8', errors='replace'), detail=detail, repaired=True)
    return Extracted(None, 'not valid UTF-8', detail)


def _from_json_line(line: str, data_cfg) -> Extracted:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return Extracted(None, 'invalid JSON', e.msg)
  if not isinstance(record, dict):
    return Extracted(None, 'not a JSON object', type(record).__name__)
  if data_cfg.format != 'text':
    return Extracted(*render(record, data_cfg))
  if data_cfg.instruction_field:
    fields = {}
    for role, name in (('instruction', data_cfg.instruction_field), ('response', data_cfg.response_field)):
      fields[role], problem = string_field(record, name)
      if problem:
        return Extracted(None, problem)
    return Extracted(data_cfg.instruction_format.format(**fields))
  text, problem = string_field(record, data_cfg.text_field)
  return Extracted(text, problem)


def extract_text(record: Record, data_cfg) -> Extracted:
  """The record's text, decoded and (for JSONL) validated, or why it is unusable."""
  raw = record.payload
  if isinstance(raw, str):  # a file's path or URL
    raw = paths.path(raw).read_bytes()
  decoded = _decode(raw, record.where, data_cfg.on_bad_utf8)
  if decoded.text is None or data_cfg.source != 'jsonl':
    return decoded
  if not decoded.text.strip():
    return Extracted(None, 'blank line')
  extracted = _from_json_line(decoded.text, data_cfg)
  return dataclasses.replace(extracted, repaired=decoded.repaired, detail=extracted.detail or decoded.detail)
