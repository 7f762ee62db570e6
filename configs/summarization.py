"""Recipe: summarization, by instruction tuning GPT-2 (docs/recipes.md#summarization).

  python -m jaxgpt.train --config configs/summarization.py:small --workdir runs/summarization \
      --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --task summarization --workdir runs/summarization \
      --data examples/summarization/test.jsonl

Alpaca JSONL: {"instruction": "Summarize the text in one sentence.", "input": the document,
"output": the summary}; only the summary is trained on. The metric is ROUGE-1/2/L (and BLEU) of
the model's summaries of held-out documents against the references.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_alpaca  # noqa: E402  (a sibling config: instruction tuning of GPT-2)


def get_config(size: str = 'small'):
  c = sft_alpaca.get_config(size)
  c.data.path = 'examples/summarization/train.jsonl'
  c.data.val_fraction = 0.1
  c.sample.prompts = ('<|user|>\nSummarize the text in one sentence.\n\nThe harbour froze for the first time in '
                      'twenty years, and children skated where the fishing boats usually moor.\n<|assistant|>\n',)
  return c
