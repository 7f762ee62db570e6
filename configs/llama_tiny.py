"""The Llama-style architecture of configs/llama_1b.py at quickstart size, for a CPU.

  python -m jaxgpt.train --config configs/llama_tiny.py --workdir runs/llama_tiny
"""

from jaxgpt.config import base_config


def get_config():
  c = base_config()
  c.model.update(num_heads=4, num_kv_heads=2, position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                 tie_embeddings=False, mlp_dim=704)  # SwiGLU's three matrices ~ GELU's two at 4x width
  return c
