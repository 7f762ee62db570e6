"""Tables: Parquet files ('parquet') and a Hugging Face dataset saved with `save_to_disk` ('arrow').

Both are read with pyarrow a batch of rows at a time, only the columns extraction needs (the text
fields, data.id_field, data.filter_field). A row is keyed by its data.id_field value, or by its file's
name and its row number. A file lacking a text column is one 'bad shard' in the report.
"""

import json
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra
from jaxgpt.data.sources.base import Record, Shard, ShardedSource, list_shards
from jaxgpt.data.sources.structured import fields_read, id_key, required_fields

_BATCH_ROWS = 1024


class _Table(ShardedSource):
  """Rows of Arrow record batches, shard after shard."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    require_extra('corpus', 'pyarrow')

  def _batches(self, file, shard: Shard) -> tuple[list[str], Iterator]:
    """The columns of `file` and an iterator over its record batches of the columns needed."""
    raise NotImplementedError

  def read(self, shard: Shard) -> Iterator[Record]:
    with paths.path(shard.path).open('rb') as file:
      columns, batches = self._batches(file, shard)
      missing = [f for f in required_fields(self.cfg) if f not in columns]
      if missing:
        raise ValueError(f'no column {", ".join(map(repr, missing))} (it has {", ".join(columns)}); set '
                         'data.text_field (or the instruction fields) to one of them')
      row = 0
      for batch in batches:
        for values in batch.to_pylist():
          key = id_key(values.get(self.cfg.id_field)) or f'row:{shard.name}:{row}'
          size = sum(len(v) for v in values.values() if isinstance(v, (str, bytes)))
          yield Record(key, f'{shard.path}[{row}]', size, values)
          row += 1

  def _wanted(self, columns: list[str]) -> list[str]:
    return [c for c in fields_read(self.cfg) if c in columns]

  def total_bytes(self) -> None:
    return None  # compressed on disk; the bar counts text


class ParquetFiles(_Table):
  """Parquet files: data.path names files, directories (every .parquet under them) or globs, comma-separated."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    self.shards = list_shards(data_cfg, ('.parquet',), 'a .parquet file, a directory of them or a glob')

  def _batches(self, file, shard):
    import pyarrow.parquet as pq
    table = pq.ParquetFile(file)
    columns = table.schema_arrow.names
    return columns, table.iter_batches(batch_size=_BATCH_ROWS, columns=self._wanted(columns))


class ArrowDataset(_Table):
  """A `datasets.Dataset.save_to_disk` directory: its Arrow files in the order its state.json lists them."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    directory = paths.path(self.root)
    if (directory / 'dataset_dict.json').exists():
      splits = json.loads((directory / 'dataset_dict.json').read_text())['splits']
      raise JaxgptError(f'data.path={self.root} holds a DatasetDict: point it at one of its splits, e.g. '
                        f'{", ".join(str(directory / s) for s in splits)}.')
    if not (directory / 'state.json').exists():
      raise JaxgptError(f'data.path={self.root} is not a directory written by datasets\' save_to_disk (it has no '
                        'state.json). Point it at one, or use data.source=parquet or jsonl for other files.')
    names = [f['filename'] for f in json.loads((directory / 'state.json').read_text())['_data_files']]
    self.shards = [Shard(str(directory / n), n, paths.stat(directory / n)) for n in names]

  def _batches(self, file, shard):
    import pyarrow as pa
    reader = pa.ipc.open_stream(file)
    columns = reader.schema.names
    wanted = self._wanted(columns)
    return columns, (batch.select(wanted) for batch in reader)
