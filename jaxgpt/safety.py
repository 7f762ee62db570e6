"""Profanity/toxicity checks and PII scrubbing for any text: corpora, prompts, outputs.

`SafetyChecker(config).check(text)` says whether a text is profane, from two
signals. The first is alt-profanity-check's classifier (a linear model over
words, trained on labelled toxic comments), run on each distinct line: the text
is profane when at least `flagged_line_fraction` of its distinct lines score
`classifier_threshold` or more. One line is too little evidence in a long
document (a single 'bastard' or 'ass' flags nearly every classic play), while a
short text such as a one-line prompt is judged by its one line; a line repeated
(a speaker's name in a play, a refrain) counts once. The second signal is
whole-word matches against user word lists: any one makes a text profane. What
to do with a profane text (drop, flag) is the caller's decision.

The classifier is alt-profanity-check's trained model (a TF-IDF vectorizer and
five sigmoid-calibrated linear SVMs) evaluated here with numpy and scipy: one
regex pass over all of a text's lines and one sparse matrix product, instead of
the library's `predict_prob`, which spends milliseconds per call in
scikit-learn's input checks (about 5x slower on prose). It computes the same
floating-point operations in the same order, so the scores are identical, bit
for bit (tests/test_safety.py).

`scrub_pii(text)` replaces e-mail addresses, phone numbers and IP addresses
with placeholders and says how many of each it replaced.
"""

import collections
import dataclasses
import ipaddress
import re
import time

import numpy as np
import phonenumbers

from jaxgpt import paths
from jaxgpt.config import JaxgptError, base_config

EMAIL_PLACEHOLDER, PHONE_PLACEHOLDER, IP_PLACEHOLDER = '<EMAIL>', '<PHONE>', '<IP>'
_EXAMPLE_LINES = 3  # flagged lines kept in SafetyFlags for reports and logs
_EXAMPLE_CHARS = 120
_LINE_BREAK, _UNKNOWN = -2, -1  # token ids besides the vocabulary's

_EMAIL = re.compile(r'\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b')
# An address ends where no word character and no '.digit' follows, so a full stop
# after it still ends it while '1.2.3.4.5' (a version, not an address) is left alone.
_IPV4 = re.compile(r'(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)')
# An IPv6 address likewise ends at a hex digit not followed by ':hex', so 'at 2001:db8::1: the host' keeps its colon.
_IPV6 = re.compile(r'(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?<=[0-9A-Fa-f])(?!\w|:[0-9A-Fa-f])')
# Phone numbers are found by phonenumbers (Google's libphonenumber), which checks
# each candidate against its country's numbering plan and usual digit grouping:
# with a +country code, any country's numbers; without one, PHONE_REGION's.
# Dates, versions, ISBNs and fictional 555 numbers are not valid numbers. Digits
# written neither after a + nor in three or more groups ('4155552671', '1234.5678901',
# 'x + 2784375'), or that a decimal point joins to more digits ('+35236450.6'), are
# left alone: in code and tables they are far more often numbers.
PHONE_REGION = 'US'
_GROUPED_DIGITS = re.compile(r'^\+\d|\d[ \t().\-/]+\d+[ \t().\-/]+\d')
_DECIMAL_BEFORE, _DECIMAL_AFTER = re.compile(r'\d[.,]$'), re.compile(r'[.,]\d')
# The matcher parses every digit run it meets, which is slow on code: it is shown only runs
# of 7 or more digits and separators on one line, with one character of context each side.
_DIGIT_RUN = re.compile(r'\+?\d[\d \t().\-/]{5,}\d')


@dataclasses.dataclass(frozen=True)
class SafetyFlags:
  profane: bool = False
  score: float = 0.0  # the classifier's highest line probability
  words: tuple[str, ...] = ()  # blocked words found
  line: str = ''  # the line that made the text profane, for reports
  flagged_fraction: float = 0.0  # share of the text's distinct lines at or over the classifier threshold
  flagged_lines: tuple[str, ...] = ()  # those lines, highest score first (a few), when the text is profane

  def reason(self) -> str:
    """Why the text is profane, with the lines that decided it: for reports and logs."""
    if self.words:
      return f'{", ".join(self.words)}: {self.line!r}'
    return (f'classifier flagged {self.flagged_fraction:.0%} of distinct lines: '
            + ', '.join(map(repr, self.flagged_lines)))


class SafetyChecker:
  """Checks texts against the classifier and blocked words in `config` (config.data.safety).

  Fields read: classifier_threshold (0 turns the classifier off), flagged_line_fraction,
  blocked_words (a sequence), blocked_words_file (a path, one word per line). A field
  missing from `config` (a server builds it from its own flags) takes base_config's default.
  """

  def __init__(self, config):
    defaults = base_config().data.safety
    setting = lambda name: config.get(name, defaults[name])
    self._threshold = float(setting('classifier_threshold'))
    self._fraction = float(setting('flagged_line_fraction'))
    if not 0 <= self._fraction <= 1:
      raise JaxgptError(f'data.safety.flagged_line_fraction={self._fraction} must be in [0, 1] '
                        '(0: any one flagged line makes a text profane).')
    words = [w.strip().lower() for w in setting('blocked_words') if w.strip()]
    path = setting('blocked_words_file')
    if path:
      path = paths.expand(path)
      try:
        lines = paths.path(path).read_text().split('\n')
        words += [w.strip().lower() for w in lines if w.strip() and not w.startswith('#')]
      except (OSError, UnicodeDecodeError) as e:
        raise JaxgptError(f'cannot read data.safety.blocked_words_file={path!r} ({e}).') from None
    self._blocked = re.compile(r'\b(?:' + '|'.join(map(re.escape, sorted(set(words)))) + r')\b',
                               re.IGNORECASE) if words else None
    self._classifier = ProfanityClassifier() if self._threshold > 0 else None
    self.seconds = collections.Counter()  # per signal, for tools/bench_data.py

  def check(self, text: str) -> SafetyFlags:
    start = time.perf_counter()
    words, line = (), ''
    if self._blocked is not None:
      found = self._blocked.search(text)
      if found:
        words = tuple(sorted({m.lower() for m in self._blocked.findall(text)}))
        line = _line_around(text, found.start())
    classifying = time.perf_counter()
    self.seconds['word lists'] += classifying - start
    score, fraction, flagged = 0.0, 0.0, []
    if self._classifier is not None:
      lines = list(dict.fromkeys(l.strip() for l in text.splitlines() if l.strip()))
      if lines:
        scores = self._classifier.scores(lines)
        score = float(scores.max())
        flagged = sorted(((s, l) for s, l in zip(scores, lines) if s >= self._threshold), reverse=True)
        fraction = len(flagged) / len(lines)
    self.seconds['classifier'] += time.perf_counter() - classifying
    by_classifier = bool(flagged) and fraction >= self._fraction
    profane = bool(words) or by_classifier
    if by_classifier and not line:
      line = flagged[0][1]
    examples = tuple(l[:_EXAMPLE_CHARS] for _, l in flagged[:_EXAMPLE_LINES]) if profane else ()
    return SafetyFlags(profane=profane, score=score, words=words, line=line.strip()[:_EXAMPLE_CHARS] if profane else '',
                       flagged_fraction=fraction, flagged_lines=examples)


class ProfanityClassifier:
  """alt-profanity-check's model, scoring many lines per call: `scores(lines)` equals `predict_prob(lines)`."""

  def __init__(self):
    # scikit-learn takes a second to import: only when used.
    import scipy.sparse
    import scipy.special
    from profanity_check.profanity_check import model, vectorizer
    from sklearn.preprocessing import normalize
    self._sparse_matrix, self._expit, self._normalize = scipy.sparse.csr_array, scipy.special.expit, normalize
    # The vectorizer lowercases each line and keeps the vocabulary's words among its token_pattern matches
    # (stop words are not in the vocabulary); '\n' cannot occur in a line, so one pass over the lines joined
    # by '\n' finds every line's tokens and, between them, the line breaks.
    self._tokens = re.compile(vectorizer.token_pattern + r'|\n')
    self._ids = {**vectorizer.vocabulary_, '\n': _LINE_BREAK}
    self._idf = vectorizer.idf_
    classifiers = model.calibrated_classifiers_
    self._weights = np.stack([c.estimator.coef_[0] for c in classifiers], axis=1)  # vocabulary x classifiers
    self._intercepts = np.array([c.estimator.intercept_[0] for c in classifiers])
    self._slopes = np.array([c.calibrators[0].a_ for c in classifiers])
    self._offsets = np.array([c.calibrators[0].b_ for c in classifiers])

  def scores(self, lines: list[str]) -> np.ndarray:
    """The probability that each line (without line breaks) is profane."""
    tokens = self._tokens.findall('\n'.join(lines).lower())
    ids = np.array([self._ids.get(t, _UNKNOWN) for t in tokens], np.int64)
    rows = np.cumsum(ids == _LINE_BREAK)
    known = ids >= 0
    counts = self._sparse_matrix((np.ones(np.count_nonzero(known)), (rows[known], ids[known])),
                                 shape=(len(lines), len(self._idf)))
    counts.sum_duplicates()  # sorted column indices, as the vectorizer's matrix has: the same sums, in order
    counts.data *= self._idf[counts.indices]
    tfidf = self._normalize(counts, copy=False)
    decisions = tfidf @ self._weights + self._intercepts
    probabilities = self._expit(-(self._slopes * decisions + self._offsets))
    total = np.zeros(len(lines))
    for column in probabilities.T:  # summed one classifier after another, as CalibratedClassifierCV does
      total += column
    return total / len(self._intercepts)


def _line_around(text: str, index: int) -> str:
  start = text.rfind('\n', 0, index) + 1
  end = text.find('\n', index)
  return text[start:end if end >= 0 else len(text)]


def _is_personal_ip(candidate: str) -> bool:
  # '1::2' is a valid IPv6 address and also a Python slice: ask for three groups of digits.
  if ':' in candidate and sum(1 for g in candidate.split(':') if g) < 3:
    return False
  try:
    address = ipaddress.ip_address(candidate)
  except ValueError:
    return False
  # 127.0.0.1 and 0.0.0.0 name no one's machine, and code is full of them.
  return not (address.is_loopback or address.is_unspecified)


def _phone_spans(text: str):
  """(start, end) of each phone number in `text`."""
  for run in _DIGIT_RUN.finditer(text):
    if not _GROUPED_DIGITS.search(run.group()):
      continue
    offset = max(0, run.start() - 1)
    for match in phonenumbers.PhoneNumberMatcher(text[offset:run.end() + 1], PHONE_REGION,
                                                 leniency=phonenumbers.Leniency.STRICT_GROUPING):
      start, end, raw = offset + match.start, offset + match.end, match.raw_string
      # The matcher takes the opening bracket of '(+33 1 ...)' or '[+33 1 ...]' into the number; the text keeps it.
      start += raw[0] in '([' and not any(c in raw for c in ')]')
      in_decimal = _DECIMAL_BEFORE.search(text, max(0, start - 2), start) or _DECIMAL_AFTER.match(text, end)
      if _GROUPED_DIGITS.search(text[start:end]) and not in_decimal:
        yield start, end


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
  text = _IPV4.sub(replace('ip', IP_PLACEHOLDER, _is_personal_ip), text)
  text = _IPV6.sub(replace('ip', IP_PLACEHOLDER, _is_personal_ip), text)
  pieces, end = [], 0
  for start, stop in _phone_spans(text):
    pieces += [text[end:start], PHONE_PLACEHOLDER]
    end = stop
    counts['phone'] += 1
  return ''.join(pieces) + text[end:], counts
