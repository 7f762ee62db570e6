"""The per-document cleaning steps and quality measures, on small exact examples."""

from jaxgpt.config import base_config
from jaxgpt.data import clean


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
