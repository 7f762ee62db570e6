"""What every source shares: records, the split, shard listing, and bad shards counted instead of fatal."""

import dataclasses
import hashlib
import itertools
import sysconfig
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import JaxgptError

# What a library raises when a shard's bytes are not what they claim (truncated or corrupt compression,
# malformed XML, an Arrow file that is no Arrow file) or cannot be read: the shard is then a 'bad shard'.
READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError)
_GLOB_CHARS = frozenset('*?[')


@dataclasses.dataclass(frozen=True)
class Record:
  key: str  # stable identity: decides the split
  where: str  # what reports name: a path, path:line, dataset[index], a URL in a file
  size: int  # raw bytes, for progress and the report
  # A file's path or URL (read by the worker); raw bytes; a table row (dict); a page to extract text from
  # (warc.HtmlPage, wikipedia.WikiPage); or an Extracted already decided (a bad shard, a non-HTML response).
  payload: object


@dataclasses.dataclass(frozen=True)
class Extracted:
  text: str | None  # None: unusable, for `reason`
  reason: str = ''
  detail: str = ''
  repaired: bool = False  # undecodable bytes were replaced (on_bad_utf8='repair')


class Source:
  """A stream of records, in units that can be read apart, with what the cache fingerprint must cover."""

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.root = root(data_cfg)

  def records(self) -> Iterator[Record]:
    """Every record, unit after unit: data.max_docs in all."""
    units = map(self.read_unit, self.units())
    return itertools.islice(itertools.chain.from_iterable(units), self.cfg.max_docs or None)

  def units(self) -> list:
    """The pieces the records come in, in order (shards, groups of files, index ranges): a Beam worker reads each
    with `read_unit`, this process one after the other."""
    raise NotImplementedError

  def read_unit(self, unit) -> Iterator[Record]:
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
  return ','.join(paths.expand(p) for p in patterns(data_cfg.path))


def patterns(value: str) -> list[str]:
  return [p.strip() for p in value.split(',') if p.strip()]


@dataclasses.dataclass(frozen=True)
class Shard:
  path: str  # as given or found: local and absolute, or a bucket URL
  name: str  # relative to the directory or glob it was found in: what row keys use, so moving the data keeps them
  stat: paths.FileStat


def list_shards(data_cfg, suffixes: tuple[str, ...], what: str) -> list[Shard]:
  """The files `data.path` names, sorted: comma-separated files, directories (every file under them whose name
  ends with one of `suffixes`) and globs ('data/*.jsonl.gz', 'gs://b/c4/**/*.parquet')."""
  found = {}
  for given in patterns(data_cfg.path):
    location = paths.expand(given)
    if _GLOB_CHARS & set(location):
      parts = location.split('/')
      first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
      base = '/'.join(parts[:first]) or ('/' if location.startswith('/') else '.')
      matches = paths.glob_files(str(paths.path(base)), '/'.join(parts[first:]))
    elif paths.path(location).is_dir():
      matches = {name: s for name, s in paths.glob_files(str(paths.path(location)), '**/*').items()
                 if name.endswith(suffixes)}
      base = location
    elif paths.path(location).is_file():
      base, matches = str(paths.path(location).parent), {paths.path(location).name: paths.stat(location)}
    else:
      raise JaxgptError(f'data.path: {location} does not exist. Point data.path at {what}.')
    if not matches:
      raise JaxgptError(f'data.path: nothing matches {location}. Point data.path at {what}.')
    for name, stat in matches.items():
      full = f'{str(paths.path(base)).rstrip("/")}/{name}'
      found[full] = Shard(full, name, stat)
  return [found[p] for p in sorted(found)]


class ShardedSource(Source):
  """Records from files (`shards`, listed by `list_shards`), each read by `read`. A shard that fails part-way
  (truncated, corrupt, unreadable) keeps the records read before, and becomes one 'bad shard' record naming it
  and the last good record; the other shards go on. With data.on_bad_shard='error' it is one JaxgptError
  instead."""

  shards: list[Shard]

  def read(self, shard: Shard) -> Iterator[Record]:
    raise NotImplementedError

  def units(self) -> list[Shard]:
    return self.shards

  def read_unit(self, shard: Shard) -> Iterator[Record]:
    last = None
    try:
      for record in self.read(shard):
        yield record
        last = record
    except READ_ERRORS as e:
      where = f'after {last.where}' if last else 'at its start'
      problem = f'{type(e).__name__}: {str(e)[:300]}'
      if self.cfg.on_bad_shard == 'error':
        raise JaxgptError(f'{shard.path} cannot be read {where} ({problem}). Re-download or remove it, or set '
                          "data.on_bad_shard='skip' to keep what it holds before the problem and go on.") from None
      yield Record(f'bad shard:{shard.path}', shard.path, 0, Extracted(None, 'bad shard', f'{problem}, {where}'))

  def identity(self) -> list:
    return [(s.path, s.stat.size, s.stat.mtime_ns) for s in self.shards]


def in_validation(key: str, fraction: float) -> bool:
  """Whether the document with `key` is held out; a pure function of the key."""
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < fraction


def decode(raw: bytes, where: str, on_bad_utf8: str) -> Extracted:
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
