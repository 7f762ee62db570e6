"""Fine-tune GPT-2 from a Hugging Face checkpoint directory on your own text (docs/finetuning.md).

  python -m jaxgpt.train --config configs/finetune_gpt2.py:small --workdir runs/ft \
      --config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl

The model fields must be the checkpoint's (they are GPT-2's here; a mismatch is
refused); the data is tokenized with the checkpoint's own tokenizer. Small
learning rate, short warmup, no weight decay on a model that is already trained.
"""

from jaxgpt.config import base_config

# size: (layers, heads, width), as Hugging Face's gpt2, gpt2-medium, gpt2-large, gpt2-xl
SIZES = {'small': (12, 12, 768), 'medium': (24, 16, 1024), 'large': (36, 20, 1280), 'xl': (48, 25, 1600)}


def get_config(size: str = 'small'):
  layers, heads, width = SIZES[size]
  c = base_config()
  c.seq_len = 512
  c.batch_size = 32
  c.data.source = 'jsonl'
  c.model.update(num_layers=layers, num_heads=heads, embed_dim=width, mlp_dim=4 * width, max_len=1024)
  c.optim.update(lr=5e-5, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.0)
  c.train.update(num_steps=1000, log_every=20, eval_every=200, checkpoint_every=200)
  c.sample.prompts = ('The',)
  return c
