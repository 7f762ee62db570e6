"""Runs 3 train steps of a tiny model on several meshes of 8 fake CPU devices,
then restores the fsdp8 run's checkpoint onto other meshes and runs a 4th step.

Run as a script (XLA_FLAGS must be set before jax starts). Prints one JSON
object: mesh name -> {losses, params (checksums), shard shapes, 4th-step loss
after restoring onto that mesh}.
"""

import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import sharding, state as state_lib  # noqa: E402
from jaxgpt.model import build_model  # noqa: E402
from jaxgpt.checkpoint import Checkpointer  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.data.pipeline import random_batch  # noqa: E402
from jaxgpt.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxgpt.train import make_train_step  # noqa: E402

MESHES = {'single': (1, 1, 1), 'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'fsdp4_tensor2': (1, 4, 2),
          'data2_fsdp2_tensor2': (2, 2, 2)}
VOCAB, SEQ, BATCH = 256, 32, 16


def batch(step: int) -> dict:
  return random_batch(BATCH, SEQ, VOCAB, seed=step)


def setup(mesh_shape, seq=SEQ, attention='auto'):
  config = base_config()
  config.seq_len, config.batch_size = seq, BATCH
  config.model.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=128, max_len=seq, attention=attention)
  config.optim.warmup_steps = 1
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  sharding.check_divisibility(config, mesh.shape)
  model = build_model(config, VOCAB)
  tx = make_optimizer(config.optim, 10)
  abstract = state_lib.abstract_state(model, tx, seq, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, 10), 1),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return mesh, model, tx, abstract, step


def checksums(x, seed: int) -> list[float]:
  """Sum of |x|, and x weighted by fixed random numbers: unlike the first, the second changes when values
  move between positions (a shard placed at the wrong offset) or updates have the wrong sign."""
  flat = np.asarray(x, np.float64).ravel()
  return [float(np.abs(flat).sum()), float(np.random.default_rng(seed).standard_normal(flat.size) @ flat)]


def run(mesh_shape, checkpoint_dir=None):
  mesh, model, tx, _, step = setup(mesh_shape)
  state = state_lib.create_state(model, tx, SEQ, mesh, jax.random.key(0))
  losses = []
  with sharding.activation_rules(mesh):
    for i in range(3):
      state, metrics = step(state, sharding.global_batch(batch(i), mesh))
      losses.append(float(metrics['loss']))
  if checkpoint_dir:
    checkpointer = Checkpointer(checkpoint_dir, keep=1)
    checkpointer.save(3, state, None, {})
    checkpointer.wait()
  params = [checksums(x, i) for i, x in enumerate(jax.tree.leaves(state.params))]
  with sharding.activation_rules(mesh):
    state, metrics = step(state, sharding.global_batch(batch(3), mesh))
  fourth_loss = float(metrics['loss'])
  query = state.params['blocks']['query']
  return {'losses': losses, 'params': params, 'fourth_loss': fourth_loss,
          'query_shape': list(query.shape),
          'query_shard_shape': list(query.addressable_shards[0].data.shape),
          'adam_mu_shard_shape': list(state.opt_state[1][0].mu['blocks']['query'].addressable_shards[0].data.shape)}


def first_step(mesh_shape, attention: str) -> list[float]:
  """Loss and gradient norm of one step at sequence 128 (splash's tile), packed rows, on `mesh_shape`."""
  mesh, model, tx, _, step = setup(mesh_shape, 128, attention)
  state = state_lib.create_state(model, tx, 128, mesh, jax.random.key(0))
  packed = random_batch(BATCH, 128, VOCAB, seed=0)
  packed['segment_ids'] = np.where(np.arange(128) < 50, 1, 2).repeat(BATCH).reshape(128, BATCH).T.copy()
  packed['positions'] = np.where(np.arange(128) < 50, np.arange(128), np.arange(128) - 50)[None].repeat(BATCH, 0)
  with sharding.activation_rules(mesh):
    _, metrics = step(state, sharding.global_batch(packed, mesh))
  return [float(metrics['loss']), float(metrics['grad_norm'])]


def fourth_step_after_restore(mesh_shape, checkpoint_dir) -> float:
  """Restores the 3-step state onto `mesh_shape` (resharding it) and trains one more step."""
  mesh, _, _, abstract, step = setup(mesh_shape)
  state = Checkpointer(checkpoint_dir, keep=1).restore(3, abstract)
  with sharding.activation_rules(mesh):
    _, metrics = step(state, sharding.global_batch(batch(3), mesh))
  return float(metrics['loss'])


if __name__ == '__main__':
  saved_on_fsdp8 = tempfile.mkdtemp()
  results = {name: run(shape, saved_on_fsdp8 if name == 'fsdp8' else None) for name, shape in MESHES.items()}
  for name, shape in MESHES.items():
    results[name]['fourth_loss_from_fsdp8_checkpoint'] = fourth_step_after_restore(shape, saved_on_fsdp8)
  # splash runs under shard_map: batch split over data x fsdp, heads over tensor.
  results['attention'] = {attention: first_step((2, 2, 2), attention) for attention in ('xla', 'splash')}
  print(json.dumps(results))
