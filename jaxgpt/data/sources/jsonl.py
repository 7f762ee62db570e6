"""JSON lines: one document per line, in one file or many shards, plain, gzip or zstandard compressed.

A corpus as The Pile, Dolma and FineWeb ship it: data.path names files, directories (every .jsonl,
.jsonl.gz, .jsonl.zst under them) or globs, comma-separated. Shards are read one after the other and
decompressed as they stream; reports name path:line.
"""

import contextlib
import gzip
import io
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import require_extra
from jaxgpt.data.sources.base import Record, Shard, ShardedSource, list_shards
from jaxgpt.data.sources.structured import jsonl_key

SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
_WHAT = 'a .jsonl, .jsonl.gz or .jsonl.zst file, a directory of them, or a glob such as "data/*.jsonl.zst"'
_ZSTD_READ_SIZE = 1 << 16  # compressed bytes per step: bounds memory on highly compressible text


class JsonLines(ShardedSource):

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    self.shards = list_shards(data_cfg, SUFFIXES, _WHAT)
    if any(s.path.endswith('.zst') for s in self.shards):
      require_extra('corpus', 'zstandard')

  def read(self, shard: Shard) -> Iterator[Record]:
    with paths.path(shard.path).open('rb') as raw, _decompressed(raw, shard.path) as f:
      for number, line in enumerate(f, start=1):
        yield Record(jsonl_key(line, self.cfg.id_field), f'{shard.path}:{number}', len(line), line)

  def total_bytes(self) -> int | None:
    """Known for uncompressed shards only (the progress bar counts decompressed bytes)."""
    if any(s.path.endswith(('.gz', '.zst')) for s in self.shards):
      return None
    return sum(s.stat.size for s in self.shards)


def _decompressed(raw, path: str):
  if path.endswith('.gz'):
    return gzip.GzipFile(fileobj=raw)
  if path.endswith('.zst'):
    return io.BufferedReader(ZstdReader(raw))
  return contextlib.nullcontext(raw)


class ZstdReader(io.RawIOBase):
  """A zstandard stream, frame after frame, that raises EOFError when it ends inside a frame.

  zstandard's own stream_reader ends quietly at a truncated frame, which would pass a cut-off shard as
  complete; its decompression objects say whether a frame ended (`eof`). Corrupt data raises OSError.
  """

  def __init__(self, raw):
    import zstandard
    self._error = zstandard.ZstdError
    self._raw, self._zstd = raw, zstandard.ZstdDecompressor()
    self._frame, self._in_frame = self._zstd.decompressobj(), False
    self._out, self._pos = b'', 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while self._pos == len(self._out):
      compressed = self._raw.read(_ZSTD_READ_SIZE)
      if not compressed:
        if self._in_frame:
          raise EOFError('zstandard stream ended inside a frame (the file is truncated)')
        return 0
      out = []
      while compressed:
        try:
          out.append(self._frame.decompress(compressed))
        except self._error as e:
          raise OSError(f'corrupt zstandard data ({e})') from None
        self._in_frame = True
        if self._frame.eof:  # the next frame starts in what this one left
          compressed = self._frame.unused_data
          self._frame, self._in_frame = self._zstd.decompressobj(), False
        else:
          compressed = b''
      self._out, self._pos = b''.join(out), 0
    n = min(len(buffer), len(self._out) - self._pos)
    buffer[:n] = self._out[self._pos:self._pos + n]
    self._pos += n
    return n
