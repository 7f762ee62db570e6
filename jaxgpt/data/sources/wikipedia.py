"""Wikipedia (any MediaWiki) XML dumps, e.g. enwiki-latest-pages-articles.xml.bz2: one document per article.

The dump streams through the standard library's XML parser (bz2, multistream too, decompressed as it
goes); each page's wikitext becomes plain text with mwparserfromhell in the cleaning workers:
templates, references, files, categories and interlanguage links go, links keep their shown text,
bold and italics their words. Pages are keyed by the wiki's name and the page id ('enwiki:12').
Redirects and pages outside the article namespace are counted ('redirect', 'not an article'); a page
without its id, title or text is a 'broken page'; XML that stops parsing makes the dump a 'bad shard'.
"""

import bz2
import contextlib
import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import require_extra
from jaxgpt.data.sources.base import Extracted, Record, Shard, ShardedSource, list_shards

SUFFIXES = ('.xml.bz2', '.xml')
_BLANK_LINES = re.compile(r'\n{3,}')
_DROPPED_TAGS = ('ref', 'gallery', 'math', 'score', 'timeline', 'references')


@dataclasses.dataclass(frozen=True)
class WikiPage:
  """A page's wikitext, turned into plain text in a cleaning worker."""
  wikitext: str

  def extract(self, data_cfg) -> Extracted:
    try:
      text = wikitext_to_text(self.wikitext)
    except Exception as e:  # mwparserfromhell raises its own kinds on wikitext it cannot parse
      return Extracted(None, 'broken page', f'wikitext does not parse ({type(e).__name__}: {str(e)[:200]})')
    return Extracted(text) if text else Extracted(None, 'no text in page')


def wikitext_to_text(wikitext: str) -> str:
  import mwparserfromhell
  code = mwparserfromhell.parse(wikitext)
  for tag in code.filter_tags(matches=lambda node: str(node.tag).strip().lower() in _DROPPED_TAGS):
    with contextlib.suppress(ValueError):  # inside a node removed before it
      code.remove(tag)
  for link in code.filter_wikilinks():
    if ':' in str(link.title):  # File:, Category:, de:... (a link to another namespace or wiki)
      with contextlib.suppress(ValueError):
        code.remove(link)
  lines = (line.strip() for line in code.strip_code(normalize=True, collapse=True).splitlines())
  return _BLANK_LINES.sub('\n\n', '\n'.join(lines)).strip()


class WikipediaDump(ShardedSource):
  """data.path names dumps (.xml.bz2 or .xml), directories of them or globs, comma-separated."""

  def __init__(self, data_cfg):
    super().__init__(data_cfg)
    require_extra('corpus', 'mwparserfromhell')
    self.shards = list_shards(data_cfg, SUFFIXES, 'a Wikipedia .xml.bz2 dump, a directory of them or a glob')

  def read(self, shard: Shard) -> Iterator[Record]:
    with paths.path(shard.path).open('rb') as raw:
      stream = bz2.BZ2File(raw) if shard.path.endswith('.bz2') else raw
      wiki = shard.name.split('-')[0]  # until the dump names its wiki
      events = ET.iterparse(stream, events=('start', 'end'))
      _, root = next(events)
      for event, element in events:
        tag = element.tag.rsplit('}', 1)[-1]
        if event == 'end' and tag == 'dbname':
          wiki = element.text or wiki
        elif event == 'end' and tag == 'page':
          yield _page_record(element, wiki, shard)
          root.clear()  # the pages read so far: memory stays flat


def _page_record(page, wiki: str, shard: Shard) -> Record:
  fields = {child.tag.rsplit('}', 1)[-1]: child for child in page}
  revision = {child.tag.rsplit('}', 1)[-1]: child for child in fields.get('revision', ())}
  page_id, title = _text(fields.get('id')), _text(fields.get('title'))
  text = revision.get('text')
  where = f'{shard.path} page {page_id or "?"} ({title or "no title"})'
  key = f'{wiki}:{page_id}' if page_id else f'{wiki}:title:{title}'
  if not page_id or not title or text is None:
    missing = [n for n, v in (('id', page_id), ('title', title), ('revision text', text)) if v is None or v == '']
    return Record(key, where, 0, Extracted(None, 'broken page', f'no {", ".join(missing)}'))
  wikitext = text.text or ''
  size = len(wikitext.encode('utf-8'))
  if 'redirect' in fields:
    return Record(key, where, size, Extracted(None, 'redirect', f'to {fields["redirect"].get("title")}'))
  namespace = _text(fields.get('ns')) or '0'
  if namespace != '0':
    return Record(key, where, size, Extracted(None, 'not an article', f'namespace {namespace}'))
  return Record(key, where, size, WikiPage(wikitext))


def _text(element) -> str:
  return (element.text or '').strip() if element is not None else ''
