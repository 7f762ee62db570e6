"""Web archives: WARC files of HTTP responses (HTML extracted to text) and WET files of extracted text.

Read with FastWARC (plain, gzip or zstandard compressed; one gzip member per record or one for the
file). Only responses and conversions (WET's text records) are documents, keyed by their target URL;
requests, metadata, warcinfo and revisit records are not documents and are passed over uncounted. A
response that is not HTTP 200 or not HTML is counted ('not HTTP 200', 'not HTML'); an HTML page's
main content (navigation, headers and footers left out) is extracted by Resiliparse in the cleaning
workers. A record cut short by the end of the file makes the file a 'bad shard'.
"""

import dataclasses
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import require_extra
from jaxgpt.data.sources.base import Extracted, Record, Shard, ShardedSource, list_shards

SUFFIXES = ('.warc', '.warc.gz', '.warc.zst', '.wet', '.wet.gz', '.wet.zst')
_HTML_TYPES = ('text/html', 'application/xhtml+xml')


@dataclasses.dataclass(frozen=True)
class HtmlPage:
  """An HTTP response's body, turned into text in a cleaning worker."""
  body: bytes

  def extract(self, data_cfg) -> Extracted:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree
    tree = HTMLTree.parse_from_bytes(self.body, detect_encoding(self.body))
    text = extract_plain_text(tree, main_content=True)
    return Extracted(text) if text.strip() else Extracted(None, 'no text in HTML')


class WarcFiles(ShardedSource):
  """data.path names WARC/WET files, directories of them or globs, comma-separated."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    require_extra('corpus', 'fastwarc', 'resiliparse')
    self.shards = list_shards(data_cfg, SUFFIXES, 'a .warc.gz or .wet.gz file, a directory of them or a glob')

  def read(self, shard: Shard) -> Iterator[Record]:
    from fastwarc import warc
    with paths.path(shard.path).open('rb') as file:
      for record in warc.ArchiveIterator(file, record_types=warc.response | warc.conversion, parse_http=True):
        url = record.headers.get('WARC-Target-URI') or f'{shard.name}@{record.stream_pos}'
        body = record.reader.read()
        if len(body) < record.content_length:
          raise EOFError(f'the record of {url} ends after {len(body)} of its {record.content_length} bytes')
        where = f'{shard.path} {url}'
        if record.record_type == warc.conversion:
          yield Record(f'url:{url}', where, len(body), body)
          continue
        status = record.http_headers.status_code if record.http_headers else None
        content_type = record.http_content_type or '(none)'
        if status != 200:
          page = Extracted(None, 'not HTTP 200', f'status {status}')
        elif content_type.lower() not in _HTML_TYPES:
          page = Extracted(None, 'not HTML', content_type)
        else:
          page = HtmlPage(body)
        yield Record(f'url:{url}', where, len(body), page)

  def total_bytes(self) -> None:
    return None  # compressed on disk
