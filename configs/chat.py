"""Recipe: a conversational model, by chat fine-tuning of GPT-2 (docs/recipes.md#conversational).

  python -m jaxgpt.train --config configs/chat.py:small --workdir runs/chat --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --workdir runs/chat

JSONL of {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}, rendered with
data.template; only the assistant turns are trained on. examples/chat/train.jsonl shows the format
at toy size: point --config.data.path at your own conversations. The metric is the perplexity of
held-out assistant turns, with samples to read.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_alpaca  # noqa: E402  (a sibling config: instruction tuning of GPT-2)


def get_config(size: str = 'small'):
  c = sft_alpaca.get_config(size)
  c.data.format = 'chat'
  c.data.path = 'examples/chat/train.jsonl'
  c.data.val_fraction = 0.1  # conversation sets are small: hold out enough turns to measure
  c.sample.prompts = ('<|user|>\nHow do I keep a basil plant alive indoors?\n<|assistant|>\n',)
  return c
