"""Every kind of source on a small real file written here: exact texts, keys and counts; bad input counted
and named (or one clear error with on_bad_shard='error'), never stopping the other shards."""

import json
import os

import pytest

import corpora
from jaxgpt import config as config_module
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, sources
from jaxgpt.data.clean import Cleaner

DOCS = [{'id': i, 'text': f'Document {i}: ' + ' '.join(f'word{i}x{j}' for j in range(12))} for i in range(12)]


def _cfg(source, path, **fields):
  data = base_config().data
  data.source, data.path, data.num_workers, data.vocab_size = source, str(path), 1, 300
  data.clean.near_dedup = False
  for name, value in fields.items():
    data[name] = value
  return data


def _clean(data_cfg):
  """(kept {key: text} in order, dropped [(reason, where, detail)]) over the whole source."""
  cleaner, kept, dropped = Cleaner(data_cfg), {}, []
  for outcome in map(cleaner, sources.open_source(data_cfg).records()):
    if outcome.dropped:
      dropped.append((outcome.dropped, outcome.record.where, outcome.detail))
    else:
      kept[outcome.record.key] = outcome.text
  return kept, dropped


def test_the_config_and_the_package_name_the_same_sources():
  assert sources.SOURCES == config_module._SOURCES


def test_jsonl_shards_plain_gzip_and_multi_frame_zstandard_in_order(tmp_path):
  corpora.write_jsonl(tmp_path / 'a.jsonl', DOCS[:3])
  corpora.write_jsonl(tmp_path / 'b.jsonl.gz', DOCS[3:7])
  (tmp_path / 'sub').mkdir()
  corpora.write_jsonl(tmp_path / 'sub' / 'c.jsonl.zst', DOCS[7:], frames=3)
  (tmp_path / 'notes.txt').write_text('not a shard')
  expected = {f'id:{d["id"]}': d['text'] for d in DOCS}
  for path in (tmp_path, f'{tmp_path}/*.jsonl*,{tmp_path}/sub/*.zst'):
    kept, dropped = _clean(_cfg('jsonl', path))
    assert kept == expected and list(kept) == list(expected) and dropped == []
  # Keys do not depend on the shard: the same records, regrouped, keep their keys (and so their split).
  source = sources.open_source(_cfg('jsonl', tmp_path / 'sub' / 'c.jsonl.zst'))
  assert [r.where for r in source.records()] == [f'{tmp_path}/sub/c.jsonl.zst:{n}' for n in range(1, 6)]
  assert source.total_bytes() is None
  assert len(list(sources.open_source(_cfg('jsonl', tmp_path, max_docs=4)).records())) == 4


def test_a_truncated_gz_or_zst_shard_keeps_what_came_before_and_the_next_shard_goes_on(tmp_path):
  corpora.write_jsonl(tmp_path / '1.jsonl.zst', DOCS[:4], frames=4)  # one frame per record
  corpora.write_jsonl(tmp_path / '2.jsonl.gz', DOCS[4:8])
  corpora.write_jsonl(tmp_path / '3.jsonl', DOCS[8:])
  corpora.truncate(tmp_path / '1.jsonl.zst', os.path.getsize(tmp_path / '1.jsonl.zst') - 5)  # into the last frame
  corpora.truncate(tmp_path / '2.jsonl.gz', os.path.getsize(tmp_path / '2.jsonl.gz') - 8)  # its trailer
  kept, dropped = _clean(_cfg('jsonl', tmp_path))
  assert list(kept) == [f'id:{i}' for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11)]
  assert [(reason, where) for reason, where, _ in dropped] == [
      ('bad shard', f'{tmp_path}/1.jsonl.zst'), ('bad shard', f'{tmp_path}/2.jsonl.gz')]
  assert dropped[0][2] == ('EOFError: zstandard stream ended inside a frame (the file is truncated), '
                           f'after {tmp_path}/1.jsonl.zst:3')
  assert dropped[1][2].startswith('EOFError: Compressed file ended') and dropped[1][2].endswith('2.jsonl.gz:4')
  with pytest.raises(JaxgptError, match=r'1\.jsonl\.zst cannot be read after .*1\.jsonl\.zst:3 \(EOFError.*'
                                        "on_bad_shard='skip'"):
    list(sources.open_source(_cfg('jsonl', tmp_path, on_bad_shard='error')).records())


def test_corrupt_zstandard_data_is_a_bad_shard(tmp_path):
  corpora.write_jsonl(tmp_path / 'c.jsonl.zst', DOCS)
  data = bytearray((tmp_path / 'c.jsonl.zst').read_bytes())
  data[len(data) // 2] ^= 0xFF
  (tmp_path / 'c.jsonl.zst').write_bytes(bytes(data))
  _, dropped = _clean(_cfg('jsonl', tmp_path / 'c.jsonl.zst'))
  assert dropped[-1][:2] == ('bad shard', f'{tmp_path}/c.jsonl.zst') and 'corrupt zstandard' in dropped[-1][2]


def test_numeric_filter_keeps_forum_records_by_score(tmp_path):
  posts = [{'id': 'a', 'text': 'kept at the threshold', 'score': 3}, {'id': 'b', 'text': 'below', 'score': 2},
           {'id': 'c', 'text': 'no score'}, {'id': 'd', 'text': 'a string score', 'score': '9'},
           {'id': 'e', 'text': 'kept high', 'score': 41.5}, {'id': 'f', 'text': 'above the max', 'score': 1000}]
  corpora.write_jsonl(tmp_path / 'posts.jsonl', posts)
  kept, dropped = _clean(_cfg('jsonl', tmp_path / 'posts.jsonl', filter_field='score', filter_min=3.0,
                              filter_max=100.0))
  assert kept == {'id:"a"': 'kept at the threshold', 'id:"e"': 'kept high'}
  assert [(r, w.rsplit(':', 1)[1], d) for r, w, d in dropped] == [
      ('filtered', '2', 'score=2 < 3'), ('filtered', '3', "no field 'score'"),
      ('filtered', '4', "score='9' is not a number"), ('filtered', '6', 'score=1000 > 100')]


def test_parquet_by_column_with_a_file_missing_it_counted(tmp_path):
  (tmp_path / 'p').mkdir()
  corpora.write_parquet(tmp_path / 'p' / 'a.parquet', {'id': [7, None, 9], 'text': ['seven', 'no id', 'nine'],
                                                        'score': [5, 5, 1], 'url': ['u'] * 3})
  corpora.write_parquet(tmp_path / 'p' / 'b.parquet', {'body': ['wrong column']})
  kept, dropped = _clean(_cfg('parquet', tmp_path / 'p', filter_field='score', filter_min=2.0))
  assert kept == {'id:7': 'seven', 'row:a.parquet:1': 'no id'}
  assert dropped == [('filtered', f'{tmp_path}/p/a.parquet[2]', 'score=1 < 2'),
                     ('bad shard', f'{tmp_path}/p/b.parquet',
                      "ValueError: no column 'text' (it has body); set data.text_field (or the instruction fields) "
                      'to one of them, at its start')]
  assert _clean(_cfg('parquet', tmp_path / 'p' / 'b.parquet', text_field='body'))[0] == {
      'row:b.parquet:0': 'wrong column'}
  with pytest.raises(JaxgptError, match=r"b\.parquet cannot be read at its start \(ValueError: no column 'text'"):
    _clean(_cfg('parquet', tmp_path / 'p', on_bad_shard='error'))


def test_arrow_dataset_saved_by_datasets(tmp_path):
  datasets = pytest.importorskip('datasets')
  corpora.write_arrow_dataset(tmp_path / 'ds', {'content': ['first row', 'second row'], 'id': ['x', 'y']})
  kept, dropped = _clean(_cfg('arrow', tmp_path / 'ds', text_field='content'))
  assert kept == {'id:"x"': 'first row', 'id:"y"': 'second row'} and dropped == []
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': ['t']})}).save_to_disk(str(tmp_path / 'dd'))
  with pytest.raises(JaxgptError, match=r'holds a DatasetDict: point it at one of its splits, e.g. .*/dd/train'):
    sources.open_source(_cfg('arrow', tmp_path / 'dd'))
  with pytest.raises(JaxgptError, match='not a directory written by datasets'):
    sources.open_source(_cfg('arrow', tmp_path))


CATS = ['Cats are small domesticated carnivorous mammals, often kept as pets.',
        'They are valued by humans for companionship and for hunting vermin.']


def test_warc_responses_become_main_text_keyed_by_url_and_other_records_are_counted(tmp_path):
  pdf = b'%PDF-1.4 not text'
  corpora.write_warc(tmp_path / 'crawl.warc.gz', [
      ('http://example.com/cats', 200, 'text/html; charset=utf-8', corpora.html_page('Cats', CATS).encode()),
      ('http://example.com/cats.pdf', 200, 'application/pdf', pdf),
      ('http://example.com/gone', 404, 'text/html', b'<html><body><p>Not found</p></body></html>')],
      requests=('http://example.com/cats',))
  corpora.write_wet(tmp_path / 'crawl.wet.gz', [('http://example.com/plain', 'Plain text from a WET file.')])
  kept, dropped = _clean(_cfg('warc', tmp_path))
  assert kept == {'url:http://example.com/cats': 'Cats\n\n' + '\n\n'.join(CATS),
                  'url:http://example.com/plain': 'Plain text from a WET file.'}
  assert dropped == [('not HTML', f'{tmp_path}/crawl.warc.gz http://example.com/cats.pdf', 'application/pdf'),
                     ('not HTTP 200', f'{tmp_path}/crawl.warc.gz http://example.com/gone', 'status 404')]
  # A WARC cut short inside its last response: the pages before it are kept, the file is a bad shard.
  corpora.write_warc(tmp_path / 'cut.warc', [
      (f'http://example.com/{i}', 200, 'text/html', corpora.html_page(f'Page {i}', CATS).encode()) for i in range(3)])
  corpora.truncate(tmp_path / 'cut.warc', os.path.getsize(tmp_path / 'cut.warc') - 100)
  kept, dropped = _clean(_cfg('warc', tmp_path / 'cut.warc'))
  assert list(kept) == ['url:http://example.com/0', 'url:http://example.com/1']
  assert [(r, w) for r, w, _ in dropped] == [('bad shard', f'{tmp_path}/cut.warc')]
  assert 'the record of http://example.com/2 ends after' in dropped[0][2]


WIKITEXT = """{{Infobox animal|name=Cat|image=Cat.jpg}}
The '''cat''' (''Felis catus'') is a [[domestic animal|domesticated]] species of small [[mammal]].<ref>{{cite web|title=Cats}}</ref>
[[File:Cat poster.jpg|thumb|A cat poster]]

== History ==
Cats were first domesticated in the [[Near East]].<ref name="a">Source A</ref>
[[Category:Cats]]
[[de:Hauskatze]]"""
WIKI_PAGES = [
    {'id': 6678, 'title': 'Cat', 'text': WIKITEXT},
    {'id': 6679, 'title': 'Felis catus', 'text': '#REDIRECT [[Cat]]', 'redirect': 'Cat'},
    {'id': 6680, 'title': 'Talk:Cat', 'ns': 1, 'text': 'Is this page about cats?'},
    {'id': 6681, 'title': 'Dog'},  # no revision text
    {'id': 6682, 'title': 'Dog & wolf', 'text': "The '''dog''' is a [[wolf|canid]]."},
]


def test_wikipedia_dump_pages_become_plain_text_and_the_rest_is_counted(tmp_path):
  corpora.write_wiki_dump(tmp_path / 'testwiki-pages-articles.xml.bz2', WIKI_PAGES)
  kept, dropped = _clean(_cfg('wikipedia', tmp_path / 'testwiki-pages-articles.xml.bz2'))
  assert kept == {
      'testwiki:6678': 'The cat (Felis catus) is a domesticated species of small mammal.\n\nHistory\n'
                       'Cats were first domesticated in the Near East.',
      'testwiki:6682': 'The dog is a canid.'}
  where = f'{tmp_path}/testwiki-pages-articles.xml.bz2 page'
  assert dropped == [('redirect', f'{where} 6679 (Felis catus)', 'to Cat'),
                     ('not an article', f'{where} 6680 (Talk:Cat)', 'namespace 1'),
                     ('broken page', f'{where} 6681 (Dog)', 'no revision text')]


def test_a_wikipedia_dump_with_broken_xml_keeps_the_pages_before_it(tmp_path):
  dump = corpora.wiki_dump(WIKI_PAGES).replace(b'<title>Dog &amp; wolf</title>', b'<title>Dog & wolf</title>')
  (tmp_path / 'broken.xml').write_bytes(dump)
  kept, dropped = _clean(_cfg('wikipedia', tmp_path / 'broken.xml'))
  assert list(kept) == ['testwiki:6678']
  assert dropped[-1][:2] == ('bad shard', f'{tmp_path}/broken.xml')
  assert dropped[-1][2].startswith('ParseError: not well-formed') and dropped[-1][2].endswith('page 6681 (Dog)')


def test_language_filter_drops_other_languages_naming_the_one_found(tmp_path):
  corpora.write_jsonl(tmp_path / 'mixed.jsonl', [
      {'id': 'en', 'text': 'The cat sat on the mat and looked out of the window at the birds in the garden.'},
      {'id': 'de', 'text': 'Die Katze sass auf der Matte und schaute aus dem Fenster auf die Voegel im Garten.'},
      {'id': 'fr', 'text': 'Le chat était assis sur le tapis et regardait les oiseaux du jardin par la fenêtre.'}])
  kept, dropped = _clean(_cfg('jsonl', tmp_path / 'mixed.jsonl', languages=('en',)))
  assert list(kept) == ['id:"en"']
  assert [(reason, detail.split(' ')[0]) for reason, _, detail in dropped] == [('language', 'de'), ('language', 'fr')]
  assert all(0.5 < float(detail.split('(')[1].rstrip(')')) <= 1 for _, _, detail in dropped)
  kept, _ = _clean(_cfg('jsonl', tmp_path / 'mixed.jsonl', languages=('en', 'fr'), min_language_score=0.0))
  assert list(kept) == ['id:"en"', 'id:"fr"']
  with pytest.raises(JaxgptError, match=r"data.languages: 'english' not among"):
    sources.open_source(_cfg('jsonl', tmp_path / 'mixed.jsonl', languages=('english',)))


def test_prepare_over_a_mixed_glob_reports_the_bad_shard_and_reuses_its_cache(tmp_path):
  corpora.write_jsonl(tmp_path / 'a.jsonl', DOCS[:4])
  corpora.write_jsonl(tmp_path / 'b.jsonl.gz', DOCS[4:8])
  corpora.write_jsonl(tmp_path / 'c.jsonl.zst', DOCS[8:], frames=4)
  corpora.truncate(tmp_path / 'c.jsonl.zst', os.path.getsize(tmp_path / 'c.jsonl.zst') - 3)
  cfg = _cfg('jsonl', f'{tmp_path}/*.jsonl*', cache_dir=str(tmp_path / 'cache'), vocab_size=300)
  data = builder.prepare(cfg, log=lambda m: None)
  report = json.loads((tmp_path / 'cache' / os.path.basename(data.directory) / 'report.json').read_text())
  assert report['read']['documents'] == 12 and report['kept']['documents'] == 11
  assert report['dropped']['bad shard']['examples'] == [
      f'{tmp_path}/c.jsonl.zst (EOFError: zstandard stream ended inside a frame (the file is truncated), '
      f'after {tmp_path}/c.jsonl.zst:3)']
  assert builder.prepare(cfg, log=lambda m: None).reused
  corpora.write_jsonl(tmp_path / 'c.jsonl.zst', DOCS[8:], frames=4)  # the shard downloaded again: rebuilt
  assert not builder.prepare(cfg, log=lambda m: None).reused


@pytest.mark.parametrize('fields, message', [
    ({'source': 'csv'}, "data.source='csv' is not one of 'stdlib', 'dir', 'jsonl', 'parquet'"),
    ({'source': 'warc'}, "data.source='warc' needs data.path"),
    ({'source': 'dir', 'path': 'x', 'filter_field': 'score'}, 'filter_field applies to records with fields'),
    ({'filter_min': 5.0, 'filter_max': 1.0}, 'data.filter_min=5.0 exceeds data.filter_max=1.0'),
    ({'min_language_score': 1.5}, 'min_language_score=1.5 must be a probability'),
    ({'on_bad_shard': 'ignore'}, "data.on_bad_shard='ignore' is not 'skip' or 'error'"),
])
def test_bad_source_settings_are_one_clear_error(fields, message):
  config = base_config()
  for name, value in fields.items():
    config.data[name] = value
  with pytest.raises(JaxgptError, match=message.replace('(', r'\(').replace('.', r'\.')):
    config_module.validate(config)
