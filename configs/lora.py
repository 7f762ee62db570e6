"""LoRA fine-tuning of GPT-2 from a Hugging Face checkpoint directory (docs/finetuning.md#lora).

  python -m jaxgpt.train --config configs/lora.py:small --workdir runs/lora \
      --config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl

Only rank-8 adapters on the attention kernels are trained; the base stays frozen, so gradients
and optimizer state are adapter-sized and a checkpoint holds the adapters alone. Sampling,
evaluation and export (`jaxgpt.convert --export_hf`) merge them into the base.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_gpt2  # noqa: E402  (a sibling config: GPT-2's shapes and fine-tuning settings)


def get_config(size: str = 'small'):
  c = finetune_gpt2.get_config(size)
  c.lora.update(rank=8, alpha=16.0, dropout=0.05, targets=('query', 'key', 'value', 'out'))
  # Adapters start at zero and are few: they take a learning rate ten times full fine-tuning's.
  c.optim.lr = 5e-4
  return c
