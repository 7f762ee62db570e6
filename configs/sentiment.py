"""Recipe: sentiment classification, by instruction tuning GPT-2 (docs/recipes.md#sentiment).

  python -m jaxgpt.train --config configs/sentiment.py:small --workdir runs/sentiment \
      --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --task sentiment --workdir runs/sentiment --data examples/sentiment/test.jsonl

Alpaca JSONL whose outputs are label words: {"instruction": "Is this review positive, negative or
neutral?", "input": the review, "output": "positive"}. No classifier head: evaluation scores each
label by the model's log-likelihood of it as the response, and reports accuracy and macro-F1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_alpaca  # noqa: E402  (a sibling config: instruction tuning of GPT-2)


def get_config(size: str = 'small'):
  c = sft_alpaca.get_config(size)
  c.data.path = 'examples/sentiment/train.jsonl'
  c.data.val_fraction = 0.1
  c.sample.prompts = ('<|user|>\nIs this review positive, negative or neutral?\n\nThe tea was cold but the cake was '
                      'excellent.\n<|assistant|>\n',)
  return c
