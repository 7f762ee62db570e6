"""Runs 3 train steps of a tiny model on several meshes of 8 fake CPU devices.

Run as a script (XLA_FLAGS must be set before jax starts). Prints one JSON
object: mesh name -> {losses, param_checksum, shard_shapes}.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import quickstart  # noqa: E402
from jaxgpt import sharding, state as state_lib  # noqa: E402
from jaxgpt.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxgpt.train import make_train_step  # noqa: E402

MESHES = {'single': (1, 1, 1), 'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'fsdp4_tensor2': (1, 4, 2),
          'data2_fsdp2_tensor2': (2, 2, 2)}
VOCAB, SEQ, BATCH = 256, 32, 16


def run(mesh_shape):
  config = quickstart.get_config()
  config.seq_len, config.batch_size = SEQ, BATCH
  config.model.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=128, max_len=SEQ)
  config.optim.warmup_steps = 1
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  sharding.check_divisibility(config, mesh)
  model = state_lib.build_model(config, VOCAB)
  tx = make_optimizer(config.optim, 10)
  state = state_lib.create_state(model, tx, SEQ, mesh, jax.random.key(0))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, 10), 1),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  losses = []
  with sharding.activation_rules(mesh):
    for _ in range(3):
      tokens = rng.integers(3, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
      local = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
               'segment_ids': np.ones((BATCH, SEQ), np.int32),
               'positions': np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
               'loss_mask': np.ones((BATCH, SEQ), np.int32)}
      state, metrics = step(state, sharding.global_batch(local, mesh), jax.random.key(1))
      losses.append(float(metrics['loss']))
  query = state.params['blocks']['query']
  return {'losses': losses,
          'params': [float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(state.params)],
          'query_shape': list(query.shape),
          'query_shard_shape': list(query.addressable_shards[0].data.shape),
          'adam_mu_shard_shape': list(state.opt_state[1][0].mu['blocks']['query'].addressable_shards[0].data.shape)}


if __name__ == '__main__':
  print(json.dumps({name: run(shape) for name, shape in MESHES.items()}))
