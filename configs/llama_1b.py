"""A Llama-style ~1.1B model: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output.

  python -m jaxgpt.train --config configs/llama_1b.py --workdir gs://BUCKET/runs/llama1b \
      --config.data.source=jsonl --config.data.path=gs://BUCKET/data/corpus.jsonl

Shaped like Llama 3.2 1B (16 layers, width 2048, 32 query / 8 kv heads, MLP 8192)
with a 32k SentencePiece vocabulary and context 2048. As configured, FSDP over the
devices of a slice (mesh.fsdp=-1) and the batch split across slices or GPU hosts
(mesh.dcn_data=-1): TPU v5e-16 or v5p-32 (both 16 chips; a v5p name counts
TensorCores) -> fsdp=16; 4 GPU hosts of 8 -> fsdp=8 in each host x data=4 across
them, with optim.grad_accum_steps=8 so each of the 32 devices gets rows; tensor
parallelism inside a host of 8 GPUs -> fsdp=-1, tensor=8 (heads and kv heads both
divide by 8). Check a mesh with tools/plan.py before launching.
`configs/llama_tiny.py` is the same architecture at CPU size.
"""

from jaxgpt.config import base_config


def get_config():
  c = base_config()
  c.seq_len = 2048
  c.batch_size = 256  # 0.5M tokens per step
  c.data.source = 'jsonl'
  c.data.vocab_size = 32000
  c.data.val_fraction = 0.005
  c.model.update(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, mlp_dim=8192, max_len=2048,
                 position='rope', rope_theta=500000.0, norm='rmsnorm', mlp='swiglu', use_bias=False,
                 tie_embeddings=False, remat='dots')
  c.optim.update(lr=3e-4, warmup_steps=2000, grad_accum_steps=16, weight_decay=0.1)
  c.train.update(num_steps=100_000, log_every=100, eval_every=2000, eval_batches=50,
                 checkpoint_every=1000, keep_checkpoints=3)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
