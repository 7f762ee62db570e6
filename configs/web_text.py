"""Prose from the web (a directory of .txt files or JSONL): Gopher/C4-style cleaning.

  python -m jaxgpt.prepare --config configs/web_text.py --config.data.path=~/crawl
  python -m jaxgpt.train --config configs/web_text.py --config.data.path=~/crawl --workdir runs/web

Unlike the quickstart's code, prose is normalised (NFKC, ASCII punctuation),
filtered on Gopher's published thresholds (Rae et al. 2021, appendix A),
checked for profanity and scrubbed of e-mail addresses, phone numbers and IPs.
Every field: jaxgpt/config.py:base_config; what each does: docs/data.md.
"""

from jaxgpt.config import base_config


def get_config():
  c = base_config()
  c.data.source = 'dir'
  c.data.glob = '**/*.txt'
  c.data.tokenizer.special_tokens = ('<|endoftext|>',)
  clean = c.data.clean
  clean.fix_mojibake = True
  clean.unicode_form = 'NFKC'
  clean.normalize_punctuation = True
  clean.min_chars = 200
  clean.max_chars = 500_000
  clean.max_repeated_line_fraction = 0.3
  clean.max_repeated_ngram_fraction = 0.15
  clean.max_symbol_word_ratio = 0.1
  c.data.safety.profanity = 'drop'
  c.data.safety.scrub_pii = True
  c.sample.prompts = ('The ', 'In 1990, ', 'Scientists ')
  return c
