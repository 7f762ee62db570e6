"""Recipe: content generation, by fine-tuning GPT-2 on prose (docs/recipes.md#content-generation).

  python -m jaxgpt.train --config configs/content.py:small --workdir runs/content --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --workdir runs/content

JSONL of {"text": ...} (or a directory of .txt files: --config.data.source=dir), normalised as
prose is (configs/web_text.py's cleaning, without its web-crawl filters). examples/content/train.jsonl
shows the format at toy size. The metrics are held-out perplexity and bits per byte, with samples
to read; configs/web_text.py trains such a model from scratch instead.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_gpt2  # noqa: E402  (a sibling config: GPT-2's shapes and fine-tuning settings)


def get_config(size: str = 'small'):
  c = finetune_gpt2.get_config(size)
  c.data.path = 'examples/content/train.jsonl'
  c.data.val_fraction = 0.1
  c.data.clean.update(fix_mojibake=True, unicode_form='NFKC', normalize_punctuation=True)
  c.sample.prompts = ('The old lighthouse', 'Every morning the market')
  return c
