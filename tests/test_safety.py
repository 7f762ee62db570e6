"""The safety checker and PII scrubber, as a server would call them on prompts and outputs."""

import ml_collections
import pytest

from jaxgpt.config import JaxgptError
from jaxgpt.safety import SafetyChecker, scrub_pii


def _config(**fields):
  return ml_collections.ConfigDict({'classifier_threshold': 0.9, 'blocked_words': (), 'blocked_words_file': '',
                                    **fields})


def test_classifier_flags_the_profane_line_of_a_long_text():
  checker = SafetyChecker(_config())
  clean = 'def kill(self, pid):\n    os.kill(pid, signal.SIGKILL)\n' * 20
  assert not checker.check(clean).profane
  flags = checker.check(clean + 'you are a fucking idiot\n')
  assert flags.profane and flags.score >= 0.9 and flags.line == 'you are a fucking idiot'


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
  text = ('Mail john.doe@example.com or +1 (555) 123-4567, from 192.168.1.20 or 2001:db8::8a2e:370:7334.\n'
          'x = a[1::2] + 3.14159 + 12345678; v = "1.2.3.4.5"; t = "12:30:45"\n')
  scrubbed, counts = scrub_pii(text)
  assert scrubbed == ('Mail <EMAIL> or <PHONE>, from <IP> or <IP>.\n'
                      'x = a[1::2] + 3.14159 + 12345678; v = "1.2.3.4.5"; t = "12:30:45"\n')
  assert counts == {'email': 1, 'phone': 1, 'ip': 2}
