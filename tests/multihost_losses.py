"""Trains a tiny model for 3 steps as one of N local processes (or alone), then
saves, restores and trains one more step. Each process feeds only its own rows
of the same global batches.

  python multihost_losses.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR

Prints one JSON line: {"losses": [...], "after_restore": loss, "uninterrupted": loss, "untrained": loss,
"process": id, "devices": n}: the 4th batch's loss from the restored state, from the state that was saved,
and from a fresh initialisation.
"""

import json
import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, CKPT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
# Four devices in total either way, so the arithmetic is the same.
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={4 // NUM_PROCESSES}'

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import sharding, state as state_lib  # noqa: E402
from jaxgpt.model import build_model  # noqa: E402
from jaxgpt.checkpoint import Checkpointer  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.data.pipeline import random_batch  # noqa: E402
from jaxgpt.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxgpt.train import make_train_step  # noqa: E402

VOCAB, SEQ, BATCH = 256, 32, 8


def local_rows(step: int) -> dict:
  rows = slice(PROCESS_ID * BATCH // NUM_PROCESSES, (PROCESS_ID + 1) * BATCH // NUM_PROCESSES)
  return {k: v[rows] for k, v in random_batch(BATCH, SEQ, VOCAB, seed=step).items()}


def main():
  config = base_config()
  if NUM_PROCESSES > 1:
    config.distributed.update(coordinator_address=f'127.0.0.1:{PORT}', num_processes=NUM_PROCESSES,
                              process_id=PROCESS_ID)
  sharding.initialize_distributed(config.distributed)
  config.seq_len, config.batch_size = SEQ, BATCH
  config.model.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=128, max_len=SEQ)
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  config.optim.warmup_steps = 1  # full-size updates: 3 steps move the loss well beyond the tolerances
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, VOCAB)
  tx = make_optimizer(config.optim, 10)
  state = state_lib.create_state(model, tx, SEQ, mesh, jax.random.key(0))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, 10), 1),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  losses = []
  with sharding.activation_rules(mesh):
    for i in range(3):
      state, metrics = step(state, sharding.global_batch(local_rows(i), mesh))
      losses.append(float(metrics['loss']))
  checkpointer = Checkpointer(CKPT, keep=1)
  checkpointer.save(3, state, None, {'note': 'test'})
  checkpointer.wait()
  restored = checkpointer.restore(3, state_lib.abstract_state(model, tx, SEQ, mesh))
  checkpointer.close()
  fresh = state_lib.create_state(model, tx, SEQ, mesh, jax.random.key(0))
  fourth = {}
  with sharding.activation_rules(mesh):
    for name, start in (('after_restore', restored), ('uninterrupted', state), ('untrained', fresh)):
      fourth[name] = float(step(start, sharding.global_batch(local_rows(3), mesh))[1]['loss'])
  print(json.dumps({'losses': losses, **fourth, 'process': jax.process_index(), 'devices': jax.device_count()}))


if __name__ == '__main__':
  main()
