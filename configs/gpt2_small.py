"""GPT-2 small (124M parameters, context 1024), for a TPU VM or a GPU node.

  python -m jaxgpt.train --config configs/gpt2_small.py --workdir gs://BUCKET/runs/gpt2 \
      --config.data.source=jsonl --config.data.path=/data/corpus.jsonl

Sized for one host of 8 accelerators (a TPU v4-8/v5e-8 or 8 GPUs): 0.5M tokens
per step, FSDP across all devices. On more hosts keep batch_size and let
mesh.fsdp=-1 take every device. The vocabulary is 50304 (GPT-2's 50257 padded
to a multiple of 128 for fast matmuls), so param count matches GPT-2 small
up to the padding.
"""

from jaxgpt.config import base_config


def get_config():
  c = base_config()
  c.seq_len = 1024
  c.batch_size = 512  # sequences per step, global
  c.data.source = 'jsonl'
  c.data.vocab_size = 50304
  c.data.val_fraction = 0.005
  c.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, max_len=1024,
                 dtype='bfloat16', remat='dots')
  c.optim.update(lr=6e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1)
  c.train.update(num_steps=100_000, log_every=100, eval_every=2000, eval_batches=50,
                 checkpoint_every=2000, keep_checkpoints=3)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
