"""The safety checker and PII scrubber, as a server would call them on prompts and outputs."""

import glob
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.safety import ProfanityClassifier, SafetyChecker, scrub_pii
from tools.profanity_threshold import abusive_documents

PROFANITY_DATA = os.path.join(REPO, 'tests', 'data', 'profanity')
ABUSE = 'you are a fucking idiot'


def _config(**fields):
  """The checker's settings as the server builds them: without flagged_line_fraction, which takes its default."""
  return ml_collections.ConfigDict({'classifier_threshold': 0.9, 'blocked_words': (), 'blocked_words_file': '',
                                    **fields})


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _literary_scenes():
  paths = sorted(glob.glob(os.path.join(PROFANITY_DATA, 'literature', '*.txt')))
  assert len(paths) == 7
  return {os.path.basename(p): _read(p) for p in paths}


def test_one_profane_line_decides_a_short_text_but_not_a_long_document():
  checker = SafetyChecker(_config())
  prompt = checker.check(ABUSE)
  assert prompt.profane and prompt.line == ABUSE and prompt.flagged_fraction == 1.0
  assert prompt.flagged_lines == (ABUSE,) and prompt.score >= 0.9
  assert checker.check(f'Summarise this thread.\nIt started politely.\n{ABUSE}\n').profane  # 1 of 3 lines
  code = ''.join(f'def handler_{i}(self, pid):\n  os.kill(pid, signal.SIGKILL)  # stop worker {i}\n'
                 for i in range(20))
  document = checker.check(code + ABUSE + '\n')
  assert not document.profane and document.score >= 0.9 and document.flagged_fraction == pytest.approx(1 / 41)
  assert document.line == '' and document.flagged_lines == ()
  # A line repeated (a speaker's name, a refrain) is one line of evidence; so is a repeated insult.
  assert not checker.check(code + f'{ABUSE}\n' * 10).profane
  assert SafetyChecker(_config(flagged_line_fraction=0.0)).check(code + ABUSE).profane  # 0: any one line
  assert SafetyChecker(_config(blocked_words=('handler_7',))).check(code).words == ('handler_7',)  # words: any one


def test_literary_scenes_are_kept_and_dense_abuse_is_caught_at_the_defaults():
  checker = SafetyChecker(base_config().data.safety)
  any_line = SafetyChecker(_config(flagged_line_fraction=0.0))
  for name, scene in _literary_scenes().items():
    flags = checker.check(scene)
    assert not flags.profane, (name, flags)
    assert any_line.check(scene).profane, name  # each holds a line the classifier flags: 'ass', 'bastard', 'FOOL.'
  abuse = set(_read(os.path.join(PROFANITY_DATA, 'abuse.txt')).splitlines())
  dense = [text for prose_lines_per_abuse, text in abusive_documents(PROFANITY_DATA) if prose_lines_per_abuse <= 3]
  assert len(dense) == 20
  for text in dense:
    flags = checker.check(text)
    assert flags.profane and flags.flagged_fraction >= 0.2, (flags, text)
    assert len(flags.flagged_lines) == 3 and set(flags.flagged_lines) <= abuse  # the lines that decided it
    assert 'classifier flagged' in flags.reason() and repr(flags.flagged_lines[0]) in flags.reason()


def test_classifier_scores_every_line_exactly_as_the_library_does_one_line_or_many_at_a_time():
  from profanity_check import predict_prob
  lines = [l.strip() for text in (*_literary_scenes().values(), _read(os.path.join(PROFANITY_DATA, 'abuse.txt')),
                                  _read(os.path.join(REPO, 'jaxgpt', 'safety.py')))
           for l in text.splitlines() if l.strip()]
  # Unicode case rules (a final sigma, a dotted capital I), accents, words on a line's edges, no known word at all.
  lines += ['ΟΔΥΣΣΕΥΣ ΣΟΦΟΣ', 'İstanbul DAMN İT', 'Ärger über den Idioten', 'idiot', 'the of and', '___ 12 x', '-']
  classifier = ProfanityClassifier()
  scores = classifier.scores(lines)
  assert np.array_equal(scores, predict_prob(lines))  # bit for bit: a threshold decides the same way
  assert (scores >= 0.9).sum() >= 17 and (scores < 0.1).sum() > len(lines) // 2  # both kinds of line are there
  one_at_a_time = np.concatenate([classifier.scores([line]) for line in lines])
  assert np.array_equal(one_at_a_time, scores)  # a line's neighbours in a call never change its score


def test_threshold_tool_measures_precision_and_recall_per_fraction():
  result = subprocess.run([sys.executable, 'tools/profanity_threshold.py', os.path.join(PROFANITY_DATA, 'literature')],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith('   0.')}
  # fraction, precision, recall, literary documents flagged (count, share), recall for k = 1, 3, 7, 15, 31
  assert rows['0.000'][1:5] == ['0.833', '1.000', '7', '100.0%']  # any one line: every scene is flagged
  assert rows['0.075'][1:10] == ['1.000', '0.857', '0', '0.0%', '1.00', '1.00', '1.00', '0.00', '0.00']
  assert rows['0.075'][-1] == '(default)'
  assert 'flagged at the default' not in result.stdout


def test_flagged_line_fraction_out_of_range_is_a_clear_error():
  with pytest.raises(JaxgptError, match=r'flagged_line_fraction=1.5 must be in \[0, 1\]'):
    SafetyChecker(_config(flagged_line_fraction=1.5))


def test_blocked_words_match_whole_words_in_any_case(tmp_path):
  words = tmp_path / 'words.txt'
  words.write_text('# my list\nzorkmid\n')
  checker = SafetyChecker(_config(classifier_threshold=0.0, blocked_words=('Frobnicate',),
                                  blocked_words_file=str(words)))
  flags = checker.check('first line\nthen we FROBNICATE the ZorkMid\n')
  assert flags.profane and flags.words == ('frobnicate', 'zorkmid')
  assert flags.line == 'then we FROBNICATE the ZorkMid'
  assert not checker.check('frobnicated zorkmids are fine: not whole words').profane


def test_missing_word_list_is_a_clear_error(tmp_path):
  with pytest.raises(JaxgptError, match='blocked_words_file'):
    SafetyChecker(_config(blocked_words_file=str(tmp_path / 'nope.txt')))


def test_scrub_pii_replaces_emails_phones_and_ips_but_not_code():
  text = ('Mail john.doe@example.com or +1 (415) 555-2671, from 192.168.1.20 or 2001:db8::8a2e:370:7334.\n'
          'x = a[1::2] + 3.14159 + 12345678; v = "1.2.3.4.5"; t = "12:30:45"\n')
  scrubbed, counts = scrub_pii(text)
  assert scrubbed == ('Mail <EMAIL> or <PHONE>, from <IP> or <IP>.\n'
                      'x = a[1::2] + 3.14159 + 12345678; v = "1.2.3.4.5"; t = "12:30:45"\n')
  assert counts == {'email': 1, 'phone': 1, 'ip': 2}


@pytest.mark.parametrize('pii, placeholder', [
    ('jane.roe@example.org', '<EMAIL>'), ('+1 415-555-2671', '<PHONE>'), ('(415) 555-2671', '<PHONE>'),
    ('415.555.2671', '<PHONE>'), ('+44 20 7946 0958', '<PHONE>'), ('+33 1 42 68 53 00', '<PHONE>'),
    ('+31641044153', '<PHONE>'), ('203.0.113.7', '<IP>'), ('2001:db8::8a2e:370:7334', '<IP>')])
def test_scrub_pii_before_punctuation_in_brackets_and_quotes_and_at_line_ends(pii, placeholder):
  contexts = ['Reach me at {}.', 'at {}, then', 'at {}; then', 'at {}: then', 'at {}!', 'at {}?', 'at ({}).',
              'at [{}]', 'at "{}"', "at '{}'", 'at <{}>', 'at {}\nnext line', 'at {}']
  for context in contexts:
    scrubbed, counts = scrub_pii(context.format(pii))
    assert scrubbed == context.format(placeholder), context
    assert sum(counts.values()) == 1


def test_scrub_pii_leaves_numbers_in_code_and_prose_alone():
  text = ('Requires Python 3.11.7 (or python3.12.1); v = "1.2.3.4.5"; pi = 3.14159265; ratio 1.25.\n'
          'Released on 15.01.2024, 2024-01-15 and 01/15/2024 at 12:30:45.\n'
          'n = 12345678901234; key = 4155552671; card = "1234-5678-9012"; ISBN 978-3-16-148410-0.\n'
          "x + 2784375 * y - 1234.5678901; Decimal('+35236450.6'); ratio 0.857 438 2329\n"
          'Fictional (555) 123-4567; serve on 127.0.0.1:8000 or 0.0.0.0; slice a[1::2]; MAC 00:1A:2B:3C:4D:5E.\n')
  assert scrub_pii(text) == (text, {})
