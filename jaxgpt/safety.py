"""Profanity/toxicity checks and PII scrubbing for any text: corpora, prompts, outputs.

`SafetyChecker(config).check(text)` says whether a text is profane, from two
signals: alt-profanity-check's classifier (a linear model over words, trained on
labelled toxic comments), run per line so one bad line in a long document is
not averaged away, and whole-word matches against user word lists. What to do
with a profane text (drop, flag) is the caller's decision.

`scrub_pii(text)` replaces e-mail addresses, phone numbers and IP addresses
with placeholders and says how many of each it replaced.
"""

import collections
import dataclasses
import ipaddress
import os
import re

from jaxgpt.config import JaxgptError

EMAIL_PLACEHOLDER, PHONE_PLACEHOLDER, IP_PLACEHOLDER = '<EMAIL>', '<PHONE>', '<IP>'

_EMAIL = re.compile(r'\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b')
# Phone numbers: an optional +country code, then 7 to 15 digits in groups split by
# spaces, dots, dashes or parentheses. A run of digits with no separators is left
# alone: in code and tables it is far more often a number than a phone.
_PHONE = re.compile(r'(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{3,4}(?![\w.])')
_IPV4 = re.compile(r'(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])')
_IPV6 = re.compile(r'(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])')


@dataclasses.dataclass(frozen=True)
class SafetyFlags:
  profane: bool = False
  score: float = 0.0  # the classifier's highest per-line probability
  words: tuple[str, ...] = ()  # blocked words found
  line: str = ''  # the line that made the text profane, for reports


class SafetyChecker:
  """Checks texts against the classifier and blocked words in `config` (config.data.safety).

  Fields read: classifier_threshold (0 turns the classifier off), blocked_words
  (a sequence), blocked_words_file (a path, one word per line).
  """

  def __init__(self, config):
    self._threshold = float(config.classifier_threshold)
    words = [w.strip().lower() for w in config.blocked_words if w.strip()]
    if config.blocked_words_file:
      path = os.path.expanduser(config.blocked_words_file)
      try:
        with open(path, encoding='utf-8') as f:
          words += [w.strip().lower() for w in f if w.strip() and not w.startswith('#')]
      except (OSError, UnicodeDecodeError) as e:
        raise JaxgptError(f'cannot read data.safety.blocked_words_file={path!r} ({e}).') from None
    self._blocked = re.compile(r'\b(?:' + '|'.join(map(re.escape, sorted(set(words)))) + r')\b',
                               re.IGNORECASE) if words else None
    if self._threshold > 0:
      from profanity_check import predict_prob  # scikit-learn takes a second to import: only when used
      self._predict = predict_prob

  def check(self, text: str) -> SafetyFlags:
    words, line = (), ''
    if self._blocked is not None:
      found = self._blocked.search(text)
      if found:
        words = tuple(sorted({m.lower() for m in self._blocked.findall(text)}))
        line = _line_around(text, found.start())
    score = 0.0
    if self._threshold > 0:
      lines = [l for l in text.splitlines() if l.strip()]
      if lines:
        scores = self._predict(lines)
        best = int(scores.argmax())
        score = float(scores[best])
        if score >= self._threshold and not line:
          line = lines[best]
    profane = bool(words) or (self._threshold > 0 and score >= self._threshold)
    return SafetyFlags(profane=profane, score=score, words=words, line=line.strip()[:120] if profane else '')


def _line_around(text: str, index: int) -> str:
  start = text.rfind('\n', 0, index) + 1
  end = text.find('\n', index)
  return text[start:end if end >= 0 else len(text)]


def _is_ip(candidate: str) -> bool:
  # '1::2' is a valid IPv6 address and also a Python slice: ask for three groups of digits.
  if ':' in candidate and sum(1 for g in candidate.split(':') if g) < 3:
    return False
  try:
    ipaddress.ip_address(candidate)
    return True
  except ValueError:
    return False


def scrub_pii(text: str) -> tuple[str, collections.Counter]:
  """`text` with e-mail addresses, phone numbers and IP addresses replaced, and how many of each."""
  counts = collections.Counter()

  def replace(kind: str, placeholder: str, valid=lambda s: True):
    def substitute(match):
      if not valid(match.group()):
        return match.group()
      counts[kind] += 1
      return placeholder
    return substitute

  text = _EMAIL.sub(replace('email', EMAIL_PLACEHOLDER), text)
  # IPs before phones: '192.168.10.1' must not be read as a phone number.
  text = _IPV4.sub(replace('ip', IP_PLACEHOLDER, _is_ip), text)
  text = _IPV6.sub(replace('ip', IP_PLACEHOLDER, _is_ip), text)
  text = _PHONE.sub(replace('phone', PHONE_PLACEHOLDER), text)
  return text, counts
