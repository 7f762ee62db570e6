"""Loads a trained run for inference on meshes of 8 fake CPU devices and decodes on them.

  python inference_mesh.py RUN_DIR SCRATCH_DIR

Run as a script (XLA_FLAGS must be set before jax starts). Prints one JSON object
that tests/test_inference.py checks:
- per mesh: greedy (and one sampled) continuations, the model's log-probabilities
  of prompt + continuation, the KV cache's shard shape, the parameters' dtype;
- fsdp8: every parameter's bytes on device 0 and in all;
- bf16: the log-probabilities with bfloat16 parameters and computation;
- damaged_optimizer: a copy of the checkpoint whose optimizer-state bytes are overwritten,
  loaded for inference (its params compared to the intact ones) and restored whole;
- lora: a LoRA run on that run, merged on a (1,4,2) mesh and on one device, and directly;
- bad_mesh: the error for a mesh that does not divide the model.
"""

import json
import os
import shutil
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tensorstore as ts  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import inference, lora, run_dir, sample, sharding, state as state_lib  # noqa: E402
from jaxgpt.checkpoint import Checkpointer, DamagedCheckpoint  # noqa: E402
from jaxgpt.config import JaxgptError  # noqa: E402
from jaxgpt.model import build_model  # noqa: E402
from jaxgpt.optim import make_optimizer  # noqa: E402

RUN, SCRATCH = sys.argv[1], sys.argv[2]
MESHES = {'one': (1, 1, 1), 'fsdp8': (1, 8, 1), 'fsdp4_tensor2': (1, 4, 2), 'data2_fsdp2_tensor2': (2, 2, 2)}
# Three prompts (padded to the mesh's batch ways): greedy, sampled among the 20 likeliest, sampled.
PROMPTS = [[5, 17, 42, 99], [3, 250, 7, 8, 120, 64, 33, 9, 12], [1, 2]]
SAMPLINGS = [sample.Sampling(max_new_tokens=12), sample.Sampling(max_new_tokens=12, temperature=0.8, top_k=20, seed=3),
             sample.Sampling(max_new_tokens=12, temperature=1.0, seed=7)]


def mesh_of(shape):
  return inference.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def log_probs(loaded, rows):
  """log p(token | earlier tokens) of each row after its first token, by a forward pass on the loaded mesh."""
  width = max(map(len, rows))
  ways = sharding.data_parallel_size(loaded.mesh.shape)
  tokens = np.zeros((-(-len(rows) // ways) * ways, width), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
  with loaded.activation_rules():
    tokens_BxT = sharding.put_global(tokens, sharding.batch_sharding(loaded.mesh))
    logits = jax.jit(lambda params, t: loaded.model.apply({'params': params}, t))(loaded.params, tokens_BxT)
    chosen = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  chosen = np.asarray(chosen)
  return [chosen[r, :len(row) - 1].tolist() for r, row in enumerate(rows)]


def decode(loaded, tokenizer):
  with loaded.activation_rules():
    outputs = sample.generate(loaded.model, loaded.params, PROMPTS, SAMPLINGS, eos_id=tokenizer.eos_id)
    # The cache of 8 rows of 16 slots as decoding makes it on this mesh.
    host, _ = sample._start(loaded.model, [[1]] * 8, [sample.Sampling(max_new_tokens=4)] * 8, [[[0]]] * 8)
    cache = jax.tree.leaves(sample._on_devices(loaded.model, host, use_cache=True)['cache'])[0]  # a layer's keys
  tokens = [o.tokens for o in outputs]
  return {'tokens': tokens, 'log_probs': log_probs(loaded, [p + t for p, t in zip(PROMPTS, tokens)]),
          'cache_shape': list(cache.shape), 'cache_shard_shape': list(cache.addressable_shards[0].data.shape),
          'dtype': str(jax.tree.leaves(loaded.params)[0].dtype)}


def parameter_bytes(loaded):
  device = jax.devices()[0]
  flat = jax.tree.flatten_with_path(loaded.params)[0]
  return {'/'.join(k.key for k in path): [sum(s.data.nbytes for s in x.addressable_shards if s.device == device),
                                          x.nbytes] for path, x in flat}


def opt_state_values(state_dir):
  """(location, key) of every optimizer-state value stored apart from the OCDBT tree (the arrays' bytes)."""
  base = ts.KvStore.open(f'file://{state_dir}/').result()

  def entries(location):
    node = ts.ocdbt.dump(base, location).result()
    for entry in node['entries']:
      if 'node' in entry or 'location' in entry:
        yield from entries(entry.get('location') or entry['node'])
      else:
        yield entry

  root = ts.ocdbt.dump(base).result()['versions'][-1]['root']['location']
  return [(e['indirect_value'], e['key'].decode()) for e in entries(root)
          if 'indirect_value' in e and e['key'].startswith(b'opt_state.')]


def damage_optimizer_state(run_copy, step):
  """Overwrites the bytes of every optimizer-state array stored in the step's data files; returns how many."""
  state_dir = os.path.join(run_copy, 'checkpoints', str(step), 'state')
  damaged = 0
  for location, _ in opt_state_values(state_dir):
    _, prefix, name, offset, length = location.split(':')  # value:<directory>/:d/<file>:<offset>:<length>
    with open(os.path.join(state_dir, prefix, name), 'r+b') as f:
      f.seek(int(offset))
      f.write(b'\xff' * int(length))
    damaged += int(length)
  return damaged


def damaged_optimizer(config, tokenizer, intact):
  run_copy = os.path.join(SCRATCH, 'damaged')
  shutil.copytree(RUN, run_copy, ignore=shutil.ignore_patterns('eval', 'tensorboard'))
  damaged_bytes = damage_optimizer_state(run_copy, intact.step)
  loaded = inference.load(config, tokenizer, run_copy, mesh=mesh_of((1, 8, 1)))
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(intact.params)))
  model = loaded.model
  whole = state_lib.abstract_state(model, make_optimizer(config.optim, config.train.num_steps), config.seq_len,
                                   loaded.mesh)
  try:
    with Checkpointer(run_copy) as checkpoints:
      checkpoints.restore(intact.step, whole)
    whole_restore = 'restored'
  except DamagedCheckpoint as e:
    whole_restore = f'DamagedCheckpoint: {e.reason}'
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(intact.params))
  return {'damaged_bytes': damaged_bytes, 'param_bytes': param_bytes, 'params_equal_intact': same,
          'whole_restore': whole_restore}


def lora_run(config, tokenizer, base_params):
  """A LoRA run on RUN with random adapters (B non-zero), merged by the loader on two meshes and directly."""
  config = config.copy_and_resolve_references()
  config.init_from = RUN
  config.lora.update(rank=4, targets=('query', 'value', 'mlp_up'))
  workdir = os.path.join(SCRATCH, 'lora')
  one = mesh_of((1, 1, 1))
  abstract = state_lib.abstract_state(build_model(config, tokenizer.vocab_size), optax.identity(), config.seq_len,
                                      one, lora_cfg=config.lora).params
  leaves, treedef = jax.tree.flatten(abstract)
  adapters = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape) * 0.3
                                          for i, x in enumerate(leaves)])
  tx = make_optimizer(config.optim, config.train.num_steps)
  run_dir.write_run_files(workdir, config, tokenizer)
  with Checkpointer(workdir, keep=1) as checkpoints:
    checkpoints.save(3, state_lib.TrainState(step=jnp.int32(3), params=adapters, opt_state=tx.init(adapters)),
                     None, state_lib.checkpoint_meta(config, tokenizer))
  direct = lora.merge(jax.device_get(base_params), jax.device_get(adapters), config.lora)
  result = {}
  for name, shape in (('one', (1, 1, 1)), ('fsdp4_tensor2', (1, 4, 2))):
    loaded = inference.load(*run_dir.load_run(workdir), workdir, mesh=mesh_of(shape))
    result[name] = {'step': loaded.step, 'max_difference_from_direct': max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(direct)))}
  result['query_change'] = float(np.abs(np.asarray(direct['blocks']['query'] - base_params['blocks']['query'])).max())
  return result


def main():
  config, tokenizer = run_dir.load_run(RUN)
  results = {}
  for name, shape in MESHES.items():
    loaded = inference.load(config, tokenizer, RUN, mesh=mesh_of(shape))
    results[name] = decode(loaded, tokenizer)
    if name == 'fsdp8':
      results['fsdp8_bytes'] = parameter_bytes(loaded)
      results['damaged_optimizer'] = damaged_optimizer(config, tokenizer, loaded)
    if name == 'one':
      results['lora'] = lora_run(config, tokenizer, loaded.params)
  bf16 = inference.load(config, tokenizer, RUN, mesh=mesh_of((1, 8, 1)), dtype='bfloat16')
  results['bf16'] = {'dtype': str(jax.tree.leaves(bf16.params)[0].dtype), 'log_probs': log_probs(
      bf16, [p + t for p, t in zip(PROMPTS, results['one']['tokens'])])}
  try:
    inference.load(config, tokenizer, RUN, mesh=mesh_of((1, 1, 8)))
    results['bad_mesh'] = 'loaded'
  except JaxgptError as e:
    results['bad_mesh'] = str(e)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
