"""Small real corpus files in the formats jaxgpt reads, written with each format's own library: JSON-lines shards
(plain, gzip, zstandard), Parquet, a `datasets` save_to_disk directory, WARC and WET archives (FastWARC's writer)
and a Wikipedia XML dump (the export schema, bz2). Used by tests/test_sources.py and the docs' sandboxes."""

import bz2
import gzip
import json
import os
from xml.sax.saxutils import escape

EXPORT_NS = 'http://www.mediawiki.org/xml/export-0.11/'


def json_lines(records) -> bytes:
  return b''.join(json.dumps(r).encode() + b'\n' for r in records)


def write_jsonl(path, records, frames: int = 1) -> None:
  """`records` as JSON lines; a .zst file gets `frames` zstandard frames, as parallel compressors write."""
  path = str(path)
  if path.endswith('.gz'):
    data = gzip.compress(json_lines(records))
  elif path.endswith('.zst'):
    import zstandard
    step = -(-len(records) // frames)
    data = b''.join(zstandard.ZstdCompressor().compress(json_lines(records[i:i + step]))
                    for i in range(0, len(records), step))
  else:
    data = json_lines(records)
  with open(path, 'wb') as f:
    f.write(data)


def truncate(path, keep_bytes: int) -> None:
  """Cuts `path` short, as an interrupted download does."""
  os.truncate(str(path), keep_bytes)


def write_parquet(path, columns: dict) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table(columns), str(path), row_group_size=2)


def write_arrow_dataset(directory, columns: dict) -> None:
  """A Hugging Face dataset saved with `save_to_disk`, as `load_from_disk` reads it."""
  import datasets
  datasets.Dataset.from_dict(columns).save_to_disk(str(directory))


def html_page(title: str, paragraphs: list[str]) -> str:
  body = ''.join(f'<p>{p}</p>' for p in paragraphs)
  return (f'<!doctype html><html><head><title>{title}</title></head><body><nav><a href="/">Home</a> | '
          f'<a href="/about">About us</a></nav><article><h1>{title}</h1>{body}</article>'
          '<footer>Copyright 2024 Example Inc. All rights reserved.</footer></body></html>')


def write_warc(path, responses, requests=(), info: bool = True) -> None:
  """A WARC: a warcinfo record, then per response (url, status, content type, body bytes) a request record
  (for the urls in `requests`) and the response, each with its HTTP headers; gzip-compressed for .gz."""
  from fastwarc import stream_io, warc

  def record(kind, url, block, content_type):
    r = warc.WarcRecord()
    r.init_headers(kind)
    if url:
      r.headers['WARC-Target-URI'] = url
    r.headers['Content-Type'] = content_type
    r.set_bytes_content(block)
    return r

  out = stream_io.GzipWriter(str(path)) if str(path).endswith('.gz') else open(str(path), 'wb')
  if info:
    record(warc.warcinfo, '', b'software: jaxgpt tests\r\n', 'application/warc-fields').write(out)
  for url, status, content_type, body in responses:
    if url in requests:
      request = f'GET {url} HTTP/1.1\r\nHost: example.com\r\n\r\n'.encode()
      record(warc.request, url, request, 'application/http; msgtype=request').write(out)
    head = f'HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n'.encode()
    record(warc.response, url, head + body, 'application/http; msgtype=response').write(out, checksum_data=True)
  out.close()


def write_wet(path, pages) -> None:
  """A WET file: one conversion record of plain text per (url, text)."""
  from fastwarc import stream_io, warc
  out = stream_io.GzipWriter(str(path))
  for url, text in pages:
    r = warc.WarcRecord()
    r.init_headers(warc.conversion)
    r.headers['WARC-Target-URI'] = url
    r.headers['Content-Type'] = 'text/plain'
    r.set_bytes_content(text.encode())
    r.write(out)
  out.close()


def wiki_dump(pages, dbname: str = 'testwiki') -> bytes:
  """A MediaWiki XML export: per page a dict with id, title, ns (default 0), text, and redirect (a title)."""
  parts = [f'<mediawiki xmlns="{EXPORT_NS}" version="0.11" xml:lang="en">\n'
           f'  <siteinfo>\n    <sitename>Test</sitename>\n    <dbname>{dbname}</dbname>\n  </siteinfo>\n']
  for page in pages:
    parts.append('  <page>\n')
    if 'title' in page:
      parts.append(f'    <title>{escape(page["title"])}</title>\n')
    parts.append(f'    <ns>{page.get("ns", 0)}</ns>\n')
    if 'id' in page:
      parts.append(f'    <id>{page["id"]}</id>\n')
    if 'redirect' in page:
      parts.append(f'    <redirect title="{escape(page["redirect"])}" />\n')
    parts.append(f'    <revision>\n      <id>{1000 + page.get("id", 0)}</id>\n      <model>wikitext</model>\n')
    if 'text' in page:
      parts.append(f'      <text bytes="{len(page["text"].encode())}" xml:space="preserve">'
                   f'{escape(page["text"])}</text>\n')
    parts.append('    </revision>\n  </page>\n')
  parts.append('</mediawiki>\n')
  return ''.join(parts).encode()


def write_wiki_dump(path, pages, dbname: str = 'testwiki') -> None:
  with open(str(path), 'wb') as f:
    f.write(bz2.compress(wiki_dump(pages, dbname)))


def write_docs_inputs(directory, paragraphs: list[str]) -> None:
  """What docs/data.md's source commands read, in a docs sandbox: prose paragraphs in every format."""
  join = lambda *parts: os.path.join(str(directory), *parts)
  os.makedirs(join('shards'))
  half = len(paragraphs) // 2
  write_jsonl(join('shards', 'part-0.jsonl.gz'), [{'text': p} for p in paragraphs[:half]])
  write_jsonl(join('shards', 'part-1.jsonl.zst'), [{'text': p} for p in paragraphs[half:]], frames=4)
  forum = [{'id': i, 'score': i % 5, 'text': p} for i, p in enumerate(paragraphs)]
  forum.append({'id': len(forum), 'score': 4, 'text': 'Die Katze sitzt auf der Matte und schaut aus dem Fenster.'})
  write_jsonl(join('forum.jsonl'), forum)
  os.makedirs(join('fineweb'))
  for i, part in enumerate((paragraphs[:half], paragraphs[half:])):
    write_parquet(join('fineweb', f'{i:03d}.parquet'), {'text': part, 'url': [f'http://example.com/{i}'] * len(part)})
  write_arrow_dataset(join('hf_dataset'), {'text': paragraphs})
  os.makedirs(join('warc'))
  write_warc(join('warc', 'crawl-00000.warc.gz'), [
      (f'http://example.com/{i}', 200, 'text/html', html_page(f'Page {i}', [p]).encode())
      for i, p in enumerate(paragraphs)])
  write_wiki_dump(join('enwiki-latest-pages-articles.xml.bz2'), [
      {'id': i + 1, 'title': f'Page {i}', 'text': f"'''Page {i}''' is about [[docs|the docs]]. {p}"}
      for i, p in enumerate(paragraphs)], dbname='enwiki')
