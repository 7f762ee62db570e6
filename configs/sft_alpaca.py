"""Instruction tuning on Alpaca-style JSONL ({"instruction", "input", "output"}) from a base model.

  python -m jaxgpt.train --config configs/sft_alpaca.py:small --workdir runs/sft \
      --config.init_from=~/models/gpt2 --config.data.path=alpaca.jsonl

Each record is rendered with data.template; only the response and its end
marker are trained on. For chat JSONL ({"messages": [{"role", "content"}]}) add
--config.data.format=chat. Sample with the template's prompt and stop at the end marker:
  python -m jaxgpt.sample --workdir runs/sft --prompt $'<|user|>\\nName a colour.\\n<|assistant|>\\n' --stop '<|end|>'
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_gpt2  # noqa: E402  (a sibling config: GPT-2's shapes and fine-tuning settings)


def get_config(size: str = 'small'):
  c = finetune_gpt2.get_config(size)
  c.data.format = 'alpaca'
  c.data.clean.near_dedup = False  # instructions share templates: near-duplicate by design
  c.optim.lr = 2e-5
  c.sample.prompts = ('<|user|>\nGive three tips for staying healthy.\n<|assistant|>\n',)
  return c
