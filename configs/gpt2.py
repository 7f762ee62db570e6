"""GPT-2 small / medium / large / xl, for TPU VMs and GPU nodes.

  python -m jaxgpt.train --config configs/gpt2.py:medium --workdir gs://BUCKET/runs/gpt2-medium \
      --config.data.source=jsonl --config.data.path=gs://BUCKET/data/corpus.jsonl

Context 1024, bf16 compute with fp32 weights, 0.5M tokens per step (512 x 1024),
FSDP over the devices of a slice or GPU host (mesh.fsdp=-1; the batch is split
across slices, mesh.dcn_data=-1) and gradient accumulation sized so one
microbatch fits a 16 GiB TPU v5e chip at 8 chips. With 8x the chips, divide
optim.grad_accum_steps by 8. The vocabulary is 50304: GPT-2's 50257 rounded up
to a multiple of 128 for fast matmuls. Check a mesh before launching:
python tools/plan.py --config configs/gpt2.py:xl --devices 64 --config.optim.grad_accum_steps=8
"""

from jaxgpt.config import base_config

# size: (layers, heads, width, grad accumulation steps at 8 chips)
SIZES = {
    'small': (12, 12, 768, 8),  # 124M
    'medium': (24, 16, 1024, 16),  # 355M
    'large': (36, 20, 1280, 32),  # 774M
    'xl': (48, 25, 1600, 64),  # 1.56B
}


def get_config(size: str = 'small'):
  layers, heads, width, accum = SIZES[size]
  c = base_config()
  c.seq_len = 1024
  c.batch_size = 512  # sequences per step, global
  c.data.source = 'jsonl'
  c.data.vocab_size = 50304
  c.data.val_fraction = 0.005
  c.model.update(num_layers=layers, num_heads=heads, embed_dim=width, mlp_dim=4 * width, max_len=1024, remat='dots')
  c.optim.update(lr=6e-4 if size == 'small' else 3e-4, warmup_steps=2000, grad_accum_steps=accum)
  c.train.update(num_steps=100_000, log_every=100, eval_every=2000, eval_batches=50,
                 checkpoint_every=2000, keep_checkpoints=3)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
