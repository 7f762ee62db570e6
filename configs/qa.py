"""Recipe: document question answering, by instruction tuning GPT-2 (docs/recipes.md#document-qa).

  python -m jaxgpt.train --config configs/qa.py:small --workdir runs/qa --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --task qa --workdir runs/qa --data examples/qa/test.jsonl

Alpaca JSONL: {"instruction": the question, "input": the document, "output": the answer, and
optionally "answers": every accepted answer}; only the answer is trained on. The metrics are
SQuAD's exact match and token F1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_alpaca  # noqa: E402  (a sibling config: instruction tuning of GPT-2)


def get_config(size: str = 'small'):
  c = sft_alpaca.get_config(size)
  c.data.path = 'examples/qa/train.jsonl'
  c.data.val_fraction = 0.1
  c.sample.prompts = ('<|user|>\nWho keeps the key?\n\nThe key to the boathouse hangs in the harbour office and is '
                      'kept by the harbour master, Ines Duarte.\n<|assistant|>\n',)
  return c
