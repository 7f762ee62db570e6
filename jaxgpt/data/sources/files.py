"""Files as documents: the running Python's standard library ('stdlib') or a directory tree ('dir')."""

import fnmatch
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data.sources.base import Record, Source, patterns

_FILES_PER_UNIT = 1024  # files per unit, the records a Beam worker lists at a time


class FileTree(Source):
  """Every file under `root` (a local directory or a bucket's) matching an include glob and no exclude glob,
  in sorted order, keyed by its path relative to `root`. The file list is in memory; the files are read by the
  cleaning workers."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    if not paths.path(self.root).is_dir():
      raise JaxgptError(f'data.path={self.root!r} is not a directory. Point it at a directory of text files.')
    stdlib = data_cfg.source == 'stdlib'
    include = ['**/*.py'] if stdlib else patterns(data_cfg.glob)
    exclude = patterns(data_cfg.exclude) + (['site-packages/**'] if stdlib else [])
    files = {}
    for pattern in include:
      files.update((key, stat) for key, stat in paths.glob_files(self.root, pattern).items()
                   if not any(fnmatch.fnmatch(key, x) for x in exclude))
    self.keys = sorted(files)[:data_cfg.max_docs or None]
    if not self.keys:
      raise JaxgptError(f'no usable text: no files matching {data_cfg.glob!r} (excluding '
                        f'{data_cfg.exclude!r}) under {self.root}. Check data.path, data.glob and data.exclude.')
    self._stats = [files[k] for k in self.keys]

  def units(self) -> list[list[tuple[str, int]]]:
    files = [(key, stat.size) for key, stat in zip(self.keys, self._stats)]
    return [files[i:i + _FILES_PER_UNIT] for i in range(0, len(files), _FILES_PER_UNIT)]

  def read_unit(self, files: list[tuple[str, int]]) -> Iterator[Record]:
    for key, size in files:
      path = f'{self.root.rstrip("/")}/{key}'
      yield Record(key, path, size, path)

  def total_bytes(self) -> int:
    return sum(s.size for s in self._stats)

  def identity(self) -> list:
    return [(k, s.size, s.mtime_ns) for k, s in zip(self.keys, self._stats)]
