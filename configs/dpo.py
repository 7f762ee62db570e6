"""Preference tuning (DPO) of a fine-tuned model on JSONL pairs (docs/finetuning.md, Preference tuning).

  python -m jaxgpt.train --config configs/dpo.py:small --workdir runs/dpo \
      --config.init_from=runs/sft --config.data.path=prefs.jsonl

Each line is {"prompt", "chosen", "rejected"} (strings, or chat messages), rendered with data.template as
instruction tuning renders it: start from a model tuned on that template (runs/sft). The init_from model is
tuned toward the chosen responses and away from the rejected ones, and is also, frozen, the reference that
keeps it close; with --config.lora.rank=8 only adapters train, and the reference is the same weights with the
adapters off.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_gpt2  # noqa: E402  (a sibling config: GPT-2's shapes and fine-tuning settings)


def get_config(size: str = 'small'):
  c = finetune_gpt2.get_config(size)
  c.data.format = 'preference'
  c.data.clean.near_dedup = False  # pairs may share a prompt and template: near-duplicate by design
  c.train.objective = 'dpo'
  c.dpo.update(beta=0.1, label_smoothing=0.0, loss='sigmoid')
  c.batch_size = 16  # pairs: 32 rows
  # DPO moves a tuned model a little way: learning rates near 1e-6 are usual for full fine-tuning.
  c.optim.update(lr=1e-6, warmup_steps=20)
  c.sample.prompts = ('<|user|>\nGive three tips for staying healthy.\n<|assistant|>\n',)
  return c
