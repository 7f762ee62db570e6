"""The per-document cleaning steps and quality measures, on small exact examples."""

import os
import random
import subprocess
import sys
import sysconfig

from conftest import REPO
from jaxgpt.config import base_config
from jaxgpt.data import clean, sources
from jaxgpt.data.dedup import Deduplicator
from tools.near_dup_recall import edit_words

STDLIB = sysconfig.get_paths()['stdlib']


def _clean_config(**fields):
  cfg = base_config().data.clean
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def test_default_normalisation_keeps_code_as_it_is_apart_from_encoding_noise():
  code = 'def f(x):\n\t"""Naïve “quotes” — ﬁne…"""\n    return x  # ＡＢ\n'
  assert clean.normalize(code, _clean_config()) == (code, [])
  noisy = '\ufeff' + code.replace('\n', '\r\n') + '\x00\x1b'
  assert clean.normalize(noisy, _clean_config()) == (
      code, ['BOM removed', 'control characters removed', 'line endings'])


def test_every_normalisation_step_when_enabled():
  cfg = _clean_config(fix_mojibake=True, unicode_form='NFKC', normalize_punctuation=True, lowercase=True)
  text, steps = clean.normalize('CafÃ© “Quoted” — ﬁne…\u00a0Ｘ\r\n', cfg)
  assert text == 'café "quoted" - fine... x\n'
  assert steps == ['mojibake fixed', 'Unicode NFKC', 'punctuation normalised', 'lowercased', 'line endings']
  assert clean.normalize('e\u0301', _clean_config()) == ('\u00e9', ['Unicode NFC'])


def test_gopher_measures():
  assert clean.repeated_line_fraction('a\nb\na\na\n\n') == 0.5
  words = 'the cat sat on the mat the cat sat on the hat'.split()
  # 'the cat sat on the' occurs twice, so its 3-grams repeat: 2 x 14 of the 34 word characters.
  assert abs(clean.repeated_ngram_fraction(words, 3) - 28 / 34) < 1e-9
  assert clean.symbol_word_ratio('# a # b ... c …', ['a', 'b', 'c']) == 4 / 3


def test_quality_filters_report_the_first_failure_with_its_measure():
  cfg = _clean_config(min_chars=10, max_chars=100, max_repeated_line_fraction=0.3,
                      max_repeated_ngram_fraction=0.5, max_symbol_word_ratio=0.1)
  assert clean.quality_problem(' \n\t', cfg) == ('empty', '')
  assert clean.quality_problem('tiny', cfg) == ('too short', '4 < 10 characters')
  assert clean.quality_problem('x' * 101, cfg) == ('too long', '101 > 100 characters')
  assert clean.quality_problem('same line\n' * 4 + 'other\n', cfg)[0] == 'repeated lines'
  assert clean.quality_problem('one two three four five ' * 3, cfg)[0] == 'repeated n-grams'
  assert clean.quality_problem('# title ## more ### words here', cfg)[0] == 'symbol-to-word ratio'
  assert clean.quality_problem('A plain sentence of ordinary words.', cfg) is None


def test_exact_key_ignores_whitespace_and_case_only():
  assert clean.exact_key('Hello  World\n') == clean.exact_key('hello world')
  assert clean.exact_key('hello world') != clean.exact_key('hello, world')


# Profanity and PII through the cleaner: jaxgpt/safety.py decides (tests/test_safety.py), the cleaner reports.

def _cleaned(text, **safety_fields):
  data_cfg = base_config().data
  for name, value in safety_fields.items():
    data_cfg.safety[name] = value
  record = sources.Record(key='doc', where='doc.txt', size=len(text.encode()), payload=text.encode())
  return clean.Cleaner(data_cfg)(record)


def test_profanity_is_decided_per_document_and_reported_with_the_lines_that_decided_it():
  path = os.path.join(os.path.dirname(__file__), 'data', 'profanity', 'literature',
                      'much_ado_about_nothing_act_iv_scene_ii.txt')
  with open(path, encoding='utf-8') as f:
    scene = f.read()
  kept = _cleaned(scene, profanity='drop')  # 'Away! you are an ass; you are an ass.': 5% of its distinct lines
  assert kept.text == scene and not kept.dropped and kept.flags == []
  abusive = ('We met at the station at nine.\nYou are a fucking idiot.\nThe train was late again.\n'
             'Shut the fuck up, you worthless piece of shit.\n')
  reason = ("classifier flagged 50% of distinct lines: 'You are a fucking idiot.', "
            "'Shut the fuck up, you worthless piece of shit.'")
  flagged = _cleaned(abusive, profanity='flag')
  assert flagged.text == abusive and flagged.flags == [('profanity', reason)]
  dropped = _cleaned(abusive, profanity='drop')
  assert dropped.text is None and (dropped.dropped, dropped.detail) == ('profanity', reason)


def test_pii_is_scrubbed_before_sentence_punctuation():
  outcome = _cleaned('Logged in from 203.0.113.7. Call +1 415-555-2671. Or mail jo@example.org.\n', scrub_pii=True)
  assert outcome.text == 'Logged in from <IP>. Call <PHONE>. Or mail <EMAIL>.\n'
  assert outcome.changes == [('PII scrubbed: email', '1 replaced'), ('PII scrubbed: ip', '1 replaced'),
                             ('PII scrubbed: phone', '1 replaced')]


def _words(name, start=0, count=None):
  with open(os.path.join(STDLIB, name), encoding='utf-8') as f:
    words = f.read().split()
  return ' '.join(words[start:start + count if count else None])


def _outcome(where, text, clean_cfg):
  """What the Cleaner hands deduplication for a kept document named `where`."""
  record = sources.Record(where, where, len(text), b'')
  return clean.Outcome(record, text=text, exact_key=clean.exact_key(text),
                       signature=clean.minhash(text, clean_cfg.shingle_size, clean_cfg.num_perm))


def test_each_group_of_near_duplicates_keeps_its_earliest_document_even_when_its_name_sorts_later():
  cfg = _clean_config(shingle_size=2, near_dedup_threshold=0.5)
  p, q, r = (_words('argparse.py', 600 * i, 600) for i in range(3))
  # Line 9 is read before line 10 but sorts after it. They share a third of their shingles: not alike.
  docs = [('corpus.jsonl:9', f'{p} {q}'), ('corpus.jsonl:10', f'{q} {r}'),
          ('corpus.jsonl:11', f'{p} {q} {r}'),  # two thirds of it is each of them: links them into one group
          ('corpus.jsonl:12', f'{p} {q} {r}'), ('corpus.jsonl:13', f'{q}  {r}\n')]  # exact copies of 11 and 10
  dedup = Deduplicator(cfg)
  exact = [dedup.exact_original(order, _outcome(where, text, cfg)) for order, (where, text) in enumerate(docs)]
  assert exact == [None, None, None, 'corpus.jsonl:11', 'corpus.jsonl:10']
  # First-seen LSH kept line 10 (it came before 11 linked it to 9); the group rule drops it, named after line 9.
  assert dedup.near_originals() == {1: 'corpus.jsonl:9', 2: 'corpus.jsonl:9'}


def test_default_near_dedup_catches_3_percent_edits_of_a_long_document_and_not_distinct_ones():
  cfg = base_config().data.clean
  # Distinct documents by the same authors: two sections of one module, and two modules of one package.
  originals = {'argparse.py#1': _words('argparse.py', 0, 1500),
               'argparse.py#2': _words('argparse.py', 1500, 1500),
               'email/message.py': _words('email/message.py', 0, 2000),
               'email/feedparser.py': _words('email/feedparser.py')}
  dedup = Deduplicator(cfg)
  for order, (where, text) in enumerate(originals.items()):
    assert len(text.split()) >= 1000
    assert dedup.exact_original(order, _outcome(where, text, cfg)) is None, where
  assert dedup.near_originals() == {}
  rng = random.Random(0)
  vocabulary = ' '.join(originals.values()).split()
  expected = {}
  for where, text in originals.items():
    for copy in range(3):
      edited = edit_words(text, 0.03, vocabulary, rng)  # substitutions, insertions and deletions at random
      order = len(originals) + len(expected)
      assert dedup.exact_original(order, _outcome(f'{where} copy {copy}', edited, cfg)) is None
      expected[order] = where
  assert dedup.near_originals() == expected


def test_near_dup_recall_tool_measures_a_tiny_grid():
  result = subprocess.run(
      [sys.executable, 'tools/near_dup_recall.py', '--genres', 'code', '--docs', '12', '--copies', '1',
       '--shingle_sizes', '2', '--thresholds', '0.7', '--rates', '0.03'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = [line for line in result.stdout.splitlines() if line.startswith('| 2 | 128 | 0.7 |')]
  assert row.split(' | ')[3] == '100%'  # every copy with 3% of its words edited is found
