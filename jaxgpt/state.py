"""The training state, created directly sharded on the mesh.

Parameters are initialised inside `jax.jit` with out_shardings taken from the
model's logical axis names, so no device ever holds a full unsharded copy of
a model that was meant to be split.
"""

import json

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgpt import hf, lora, sharding
from jaxgpt.checkpoint import SHAPE_FIELDS, Checkpointer
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.model import GPT
from jaxgpt.optim import make_optimizer
from jaxgpt.run_dir import write_run_files

class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _init_fn(model: GPT, tx: optax.GradientTransformation, seq_len: int, lora_cfg=None):
  """The state's initialiser; with LoRA settings its params are the adapters alone."""
  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    if lora_cfg is not None:
      params = lora.init_adapters(jax.random.fold_in(rng, 1), nn.unbox(params), lora_cfg)
    # The optimizer state is built from the boxed params so it inherits their logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def state_shardings(model, tx, seq_len, mesh, rules=sharding.LOGICAL_RULES, lora_cfg=None):
  """NamedShardings for every leaf of the TrainState, from the logical axis rules."""
  abstract = jax.eval_shape(_init_fn(model, tx, seq_len, lora_cfg), jax.random.key(0))
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


def create_state(model, tx, seq_len: int, mesh, rng, rules=sharding.LOGICAL_RULES, lora_cfg=None) -> TrainState:
  init = _init_fn(model, tx, seq_len, lora_cfg)
  shardings = state_shardings(model, tx, seq_len, mesh, rules, lora_cfg)
  with sharding.activation_rules(mesh, rules):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def abstract_state(model, tx, seq_len: int, mesh, rules=sharding.LOGICAL_RULES, lora_cfg=None) -> TrainState:
  """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto `mesh`."""
  shapes = nn.unbox(jax.eval_shape(_init_fn(model, tx, seq_len, lora_cfg), jax.random.key(0)))
  shardings = state_shardings(model, tx, seq_len, mesh, rules, lora_cfg)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def checkpoint_meta(config, tokenizer: Tokenizer) -> dict:
  """What a checkpoint must agree with to be resumed: see checkpoint.check_compatible."""
  lora_cfg = lora.settings(config)
  # A LoRA checkpoint holds adapters of one rank on some kernels: only those settings can resume it.
  adapters = {} if lora_cfg is None else {'lora_rank': lora_cfg.rank, 'lora_targets': sorted(lora_cfg.targets)}
  return {
      'config': json.loads(config.to_json()),
      'tokenizer_fingerprint': tokenizer.fingerprint,
      'model_shape': {**{k: config.model[k] for k in SHAPE_FIELDS}, 'vocab_size': tokenizer.vocab_size, **adapters},
  }


def save_initial_run(config, tokenizer: Tokenizer, params, workdir: str) -> None:
  """A run directory whose step-0 checkpoint holds `params` (stacked layers) and a fresh optimizer."""
  write_run_files(workdir, config, tokenizer)
  params = hf.params_in_layout(jax.tree.map(jnp.asarray, params), config.model.scan_layers)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  checkpointer = Checkpointer(workdir, keep=1)
  checkpointer.save(0, state, None, checkpoint_meta(config, tokenizer))
  checkpointer.wait()
  checkpointer.close()
