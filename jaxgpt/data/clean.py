"""One document at a time: encoding fixes, normalisation, quality filters, safety.

`Cleaner(data_cfg)(record)` returns an `Outcome`: the cleaned text or the
reason it was dropped, the steps that changed it, the flags it raised, and what
deduplication needs (a hash of the normalised text and a MinHash signature).
It holds no state across documents, so worker processes run it in parallel;
deduplication, which does need to remember, happens afterwards in one place
(`dedup.py`).

The quality filters follow Gopher (Rae et al. 2021, appendix A) and C4: the
thresholds are config fields, and each is off (0) by default because the
quickstart corpus is code, where repeated lines and symbols are normal.
"""

import collections
import dataclasses
import hashlib
import re
import time
import unicodedata

import ftfy
import numpy as np
from datasketch import LeanMinHash, MinHash

from jaxgpt import safety
from jaxgpt.data import language, sources

# C0 and C1 control characters, except tab, newline, vertical tab, form feed and carriage return.
_CONTROL_CHARS = re.compile('[\x00-\x08\x0e-\x1f\x7f-\x9f]')
_LINE_ENDINGS = re.compile(r'\r\n?')
_PUNCTUATION = str.maketrans({
    **dict.fromkeys('\u2018\u2019\u201a\u201b\u2032', "'"),
    **dict.fromkeys('\u201c\u201d\u201e\u201f\u2033', '"'),
    **dict.fromkeys('\u2010\u2011\u2012\u2013\u2014\u2015\u2212', '-'),
    '\u2026': '...',
    **dict.fromkeys('\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a'
                    '\u202f\u205f\u3000', ' '),
    **dict.fromkeys('\u200b\u200c\u200d\u2060\ufeff', None),  # zero-width characters
})
_MINHASH_SEED = 1  # fixed: signatures must be comparable across runs and processes
_WORD = re.compile(r'\w+')


@dataclasses.dataclass
class Outcome:
  record: sources.Record
  text: str | None = None  # None when dropped
  dropped: str = ''  # the reason
  detail: str = ''
  changes: list = dataclasses.field(default_factory=list)  # (step, detail) that changed the text
  flags: list = dataclasses.field(default_factory=list)  # (flag, detail) that kept the text
  exact_key: bytes = b''
  signature: LeanMinHash | None = None  # for near-duplicate search


def normalize(text: str, clean_cfg) -> tuple[str, list[str]]:
  """The text after the enabled normalisation steps, and the names of the steps that changed it."""
  steps = [
      ('BOM removed', clean_cfg.strip_bom, lambda t: t.removeprefix('\ufeff')),
      ('control characters removed', clean_cfg.remove_control_chars, lambda t: _CONTROL_CHARS.sub('', t)),
      ('mojibake fixed', clean_cfg.fix_mojibake, ftfy.fix_encoding),
      (f'Unicode {clean_cfg.unicode_form}', clean_cfg.unicode_form,
       lambda t: unicodedata.normalize(clean_cfg.unicode_form, t)),
      ('punctuation normalised', clean_cfg.normalize_punctuation, lambda t: t.translate(_PUNCTUATION)),
      ('lowercased', clean_cfg.lowercase, str.lower),
      ('line endings', clean_cfg.unix_line_endings, lambda t: _LINE_ENDINGS.sub('\n', t)),
  ]
  changed = []
  for name, enabled, step in steps:
    if enabled:
      after = step(text)
      if after != text:
        changed.append(name)
        text = after
  return text, changed


def repeated_line_fraction(text: str) -> float:
  """Gopher: the fraction of non-blank lines that repeat an earlier line."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return 1 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_fraction(words: list[str], n: int) -> float:
  """Gopher: the fraction of word characters inside word n-grams that occur more than once."""
  if len(words) < n:
    return 0.0
  grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
  counts = collections.Counter(grams)
  covered = np.zeros(len(words), bool)
  for i, gram in enumerate(grams):
    if counts[gram] > 1:
      covered[i:i + n] = True
  lengths = np.fromiter((len(w) for w in words), np.int64, len(words))
  return float(lengths[covered].sum() / lengths.sum())


def symbol_word_ratio(text: str, words: list[str]) -> float:
  """Gopher: hash symbols and ellipses per word."""
  symbols = text.count('#') + text.count('...') + text.count('\u2026')
  return symbols / max(1, len(words))


def quality_problem(text: str, clean_cfg) -> tuple[str, str] | None:
  """The first quality filter the text fails, as (reason, detail), or None."""
  if not text.strip():
    return 'empty', ''
  if len(text) < clean_cfg.min_chars:
    return 'too short', f'{len(text)} < {clean_cfg.min_chars} characters'
  if clean_cfg.max_chars and len(text) > clean_cfg.max_chars:
    return 'too long', f'{len(text)} > {clean_cfg.max_chars} characters'
  if clean_cfg.max_repeated_line_fraction:
    fraction = repeated_line_fraction(text)
    if fraction > clean_cfg.max_repeated_line_fraction:
      return 'repeated lines', f'{fraction:.2f} of lines repeat'
  if not (clean_cfg.max_repeated_ngram_fraction or clean_cfg.max_symbol_word_ratio):
    return None
  words = _WORD.findall(text)
  if clean_cfg.max_repeated_ngram_fraction:
    fraction = repeated_ngram_fraction(words, clean_cfg.ngram_size)
    if fraction > clean_cfg.max_repeated_ngram_fraction:
      return 'repeated n-grams', f'{fraction:.2f} of characters in repeated {clean_cfg.ngram_size}-grams'
  if clean_cfg.max_symbol_word_ratio:
    ratio = symbol_word_ratio(text, words)
    if ratio > clean_cfg.max_symbol_word_ratio:
      return 'symbol-to-word ratio', f'{ratio:.2f} # or ... per word'
  return None


def exact_key(text: str) -> bytes:
  """Identical for texts that differ only in whitespace and case."""
  return hashlib.blake2b(' '.join(text.lower().split()).encode(), digest_size=16).digest()


def minhash(text: str, shingle_size: int, num_perm: int) -> LeanMinHash:
  """The MinHash of the text's word shingles (lowercased), comparable by Jaccard similarity."""
  words = text.lower().split()
  shingles = {' '.join(words[i:i + shingle_size]).encode()
              for i in range(max(1, len(words) - shingle_size + 1))}
  signature = MinHash(num_perm=num_perm, seed=_MINHASH_SEED)
  signature.update_batch(sorted(shingles))
  return LeanMinHash(signature)  # compact to send between processes


class Cleaner:
  """Cleans one record at a time according to `data_cfg` (config.data)."""

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.clean = data_cfg.clean
    checks_profanity = data_cfg.safety.profanity != 'off'
    self.checker = safety.SafetyChecker(data_cfg.safety) if checks_profanity else None
    self._seconds = collections.Counter()

  def stage_seconds(self) -> dict[str, float]:
    """Seconds spent in each step so far, over every record cleaned (tools/bench_data.py)."""
    checks = {f'safety: {signal}': s for signal, s in self.checker.seconds.items()} if self.checker else {}
    return {**self._seconds, **checks}

  def __call__(self, record: sources.Record) -> Outcome:
    lap = _Laps(self._seconds)
    extracted = sources.extract_text(record, self.cfg)
    lap('read and extract')
    if extracted.text is None:
      return Outcome(record, dropped=extracted.reason, detail=extracted.detail)
    outcome = Outcome(record)
    if extracted.repaired:
      outcome.changes.append(('invalid UTF-8 repaired', extracted.detail))
    text, steps = normalize(extracted.text, self.clean)
    outcome.changes += [(step, '') for step in steps]
    lap('normalize')
    problem = quality_problem(text, self.clean)
    lap('quality filters')
    if not problem and self.cfg.languages:
      problem = language.language_problem(text, self.cfg)
      lap('language')
    if problem:
      outcome.dropped, outcome.detail = problem
      return outcome
    if self.checker is not None:
      flags = self.checker.check(text)
      lap(None)  # the checker times its own signals
      if flags.profane:
        detail = flags.reason()
        if self.cfg.safety.profanity == 'drop':
          outcome.dropped, outcome.detail = 'profanity', detail
          return outcome
        outcome.flags.append(('profanity', detail))
    if self.cfg.safety.scrub_pii:
      text, found = safety.scrub_pii(text)
      outcome.changes += [(f'PII scrubbed: {kind}', f'{n} replaced') for kind, n in sorted(found.items())]
      lap('safety: PII')
    outcome.text = text
    if self.clean.exact_dedup:
      outcome.exact_key = exact_key(text)
      lap('exact hash')
    if self.clean.near_dedup:
      outcome.signature = minhash(text, self.clean.shingle_size, self.clean.num_perm)
      lap('MinHash')
    return outcome


class _Laps:
  """Adds the time since the previous call to `seconds[step]` (None: to no step)."""

  def __init__(self, seconds: collections.Counter):
    self._seconds, self._last = seconds, time.perf_counter()

  def __call__(self, step: str | None) -> None:
    now = time.perf_counter()
    if step:
      self._seconds[step] += now - self._last
    self._last = now
