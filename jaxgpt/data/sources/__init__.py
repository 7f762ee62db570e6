"""Raw documents in: files, JSON lines, tables, web archives, Wikipedia dumps, TFDS datasets.

A source is streamed as `Record`s (a key, a place to name in reports, the raw
payload); `extract_text` turns one record into text or says why it cannot be
used (not UTF-8, invalid JSON, a missing field, filtered out, not HTML, ...),
naming where it came from. Records are never all in memory; a file list is.
Each kind of source has its module; docs/data.md shows each with a command.

Documents are split into train and validation by a hash of their key (a file's
relative path; a record's data.id_field value, else a hash of its JSON line or
its file and row; a page's URL; a Wikipedia page id; a TFDS index), so the split
does not depend on order: inserting, deleting or moving a document moves no
other document between the splits. No document ever lands in both.
"""

from jaxgpt import paths
from jaxgpt.config import require_extra
from jaxgpt.data.sources import files, jsonl, tables, tfds, warc, wikipedia
from jaxgpt.data.sources.base import Extracted, Record, Source, decode, in_validation, root
from jaxgpt.data.sources.structured import json_line_text, jsonl_key, record_text

__all__ = ['Extracted', 'Record', 'Source', 'SOURCES', 'extract_text', 'in_validation', 'jsonl_key', 'open_source',
           'root']

_KINDS = {
    'stdlib': files.FileTree, 'dir': files.FileTree, 'jsonl': jsonl.JsonLines, 'parquet': tables.ParquetFiles,
    'arrow': tables.ArrowDataset, 'warc': warc.WarcFiles, 'wikipedia': wikipedia.WikipediaDump,
    'tfds': tfds.TfdsDataset,
}
SOURCES = tuple(_KINDS)


def open_source(data_cfg) -> Source:
  if data_cfg.languages:  # checked here, before worker processes would each fail on it
    require_extra('corpus', 'py3langid')
    from jaxgpt.data import language
    language.check_languages(data_cfg.languages)
  return _KINDS[data_cfg.source](data_cfg)


def extract_text(record: Record, data_cfg) -> Extracted:
  """The record's text, decoded and (for JSONL and tables) validated, or why it is unusable."""
  raw = record.payload
  if isinstance(raw, Extracted):  # decided while reading: a bad shard, a redirect, a non-HTML response
    return raw
  if isinstance(raw, dict):  # a table's row
    return record_text(raw, data_cfg)
  if isinstance(raw, (warc.HtmlPage, wikipedia.WikiPage)):
    return raw.extract(data_cfg)
  if isinstance(raw, str):  # a file's path or URL
    raw = paths.path(raw).read_bytes()
  decoded = decode(raw, record.where, data_cfg.on_bad_utf8)
  if decoded.text is None or data_cfg.source != 'jsonl':
    return decoded
  extracted = json_line_text(decoded.text, data_cfg)
  return Extracted(extracted.text, extracted.reason, extracted.detail or decoded.detail, decoded.repaired)
