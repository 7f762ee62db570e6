"""A weighted mixture: 70% web prose, 20% code, 10% Markdown notes (docs/data.md, Mixtures).

  python -m jaxgpt.train --config configs/mixture.py --workdir runs/mixture

Each source is cleaned its own way into its own cache; one SentencePiece
tokenizer is trained on a weighted sample of all three. Training mixes
packed rows by weight and logs each source's share of the tokens trained on.
A source's fields override data.* for it: --config.data.mixture.web.path=...
"""

from jaxgpt.config import base_config


def get_config():
  c = base_config()
  c.data.tokenizer.special_tokens = ('<|endoftext|>',)
  c.data.mixture.web = {
      'weight': 0.7, 'source': 'dir', 'path': '~/crawl', 'glob': '**/*.txt',
      # Prose: normalised and filtered as configs/web_text.py does; code below keeps the defaults.
      'clean': {'fix_mojibake': True, 'unicode_form': 'NFKC', 'normalize_punctuation': True, 'min_chars': 200,
                'max_repeated_line_fraction': 0.3, 'max_repeated_ngram_fraction': 0.15,
                'max_symbol_word_ratio': 0.1},
  }
  c.data.mixture.code = {'weight': 0.2, 'source': 'stdlib'}
  c.data.mixture.notes = {'weight': 0.1, 'source': 'dir', 'path': '~/my_texts', 'glob': '**/*.md'}
  c.sample.prompts = ('The ', 'def ', '# ')
  return c
