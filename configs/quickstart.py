"""Quickstart: a small GPT trained on the Python standard library's own source.

Runs on a 2-core CPU in a few minutes with no download:
  python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart
Point it at your own text with --config.data.source=dir --config.data.path=DIR
(or source=jsonl, path=FILE.jsonl, text_field=text).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.seq_len = 128
  c.batch_size = 16  # global, across all devices and hosts

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'  # 'stdlib' (the running Python's .py files), 'dir', or 'jsonl'
  c.data.path = ''  # a directory for 'dir', a .jsonl file for 'jsonl'
  c.data.glob = '**/*.txt'  # files taken from data.path when source='dir'
  c.data.text_field = 'text'  # the JSONL field holding each document
  c.data.max_docs = 0  # 0 = every document; a cap makes small experiments fast
  c.data.val_fraction = 0.05  # documents (files or JSONL lines) held out for validation
  c.data.on_bad_utf8 = 'skip'  # 'skip' (counted and named) or 'error'
  c.data.vocab_size = 4096  # SentencePiece BPE vocabulary, trained on the train split
  c.data.cache_dir = '~/.cache/jaxgpt'  # tokenizer and TFDS dataset, reused across runs
  c.data.shuffle = True

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 256
  c.model.mlp_dim = 1024
  c.model.max_len = 128
  c.model.dropout_rate = 0.0
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators
  c.model.scan_layers = True  # compile time independent of depth
  c.model.remat = 'none'  # 'none', 'full' or 'dots' (save matmul outputs)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.optim.warmup_steps = 30
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False  # norms and biases are never decayed
  c.optim.grad_clip = 1.0
  c.optim.grad_accum_steps = 1  # microbatches per step; batch_size must divide

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 300
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3
  c.train.peak_flops_per_device = 0.0  # 0 = look up the device, or measure a matmul on CPU

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 takes the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  c.sample.max_new_tokens = 64
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  return c
