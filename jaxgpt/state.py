"""The training state, created directly sharded on the mesh, and a run directory's files.

Parameters are initialised inside `jax.jit` with out_shardings taken from the
model's logical axis names, so no device ever holds a full unsharded copy of
a model that was meant to be split.
"""

import dataclasses
import json
import os

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jaxgpt import hf, lora, sharding
from jaxgpt.checkpoint import PARAM_SHAPE_FIELDS, SHAPE_FIELDS, Checkpointer
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer, load_byte_level_bpe
from jaxgpt.model import GPT, ModelConfig
from jaxgpt.optim import make_optimizer

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def build_model(config, vocab_size: int) -> GPT:
  return GPT(ModelConfig.from_config(config.model, vocab_size))


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


def write_run_files(workdir: str, config, tokenizer: Tokenizer) -> None:
  """The config and tokenizer that make `workdir` a run directory (`load_run` reads them)."""
  tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json(indent=2))


def save_initial_run(config, tokenizer: Tokenizer, params, workdir: str) -> None:
  """A run directory whose step-0 checkpoint holds `params` (stacked layers) and a fresh optimizer."""
  os.makedirs(workdir, exist_ok=True)
  write_run_files(workdir, config, tokenizer)
  params = hf.params_in_layout(jax.tree.map(jnp.asarray, params), config.model.scan_layers)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  checkpointer = Checkpointer(workdir, keep=1)
  checkpointer.save(0, state, None, checkpoint_meta(config, tokenizer))
  checkpointer.wait()
  checkpointer.close()


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """What `config.init_from` names: the model fields that shape it, its tokenizer and its params."""
  shape: dict
  tokenizer: Tokenizer
  params: dict  # layers stacked, as nn.scan keeps them


def load_base(config) -> BaseModel:
  """The base model at config.init_from (HF directory or jaxgpt run), checked against the config."""
  path = os.path.expanduser(config.init_from)
  if hf.is_hf_directory(path):
    fields, tokenizer, params = hf.load_hf(path)
  else:
    base_config, tokenizer = load_run(path)
    fields = base_config.model.to_dict()
    params = load_params(base_config, tokenizer, path)[1]
  shape = {k: fields[k] for k in PARAM_SHAPE_FIELDS + (('rope_theta',) if fields['position'] == 'rope' else ())}
  diffs = [f'{k}: base {v}, config {config.model[k]}' for k, v in shape.items() if config.model[k] != v]
  if diffs:
    raise JaxgptError(f'the base model at init_from={path} has another shape than config.model ({"; ".join(diffs)}). '
                      'Set config.model to the base model\'s shape (configs/finetune_gpt2.py does for GPT-2).')
  if config.data.tokenizer.kind == 'byte_bpe':
    wanted = load_byte_level_bpe(config.data.tokenizer.path, config.data.tokenizer.eos_token)
    if wanted.fingerprint != tokenizer.fingerprint:
      raise JaxgptError(f'data.tokenizer.path={config.data.tokenizer.path!r} is not the tokenizer of the base model '
                        f'at init_from={path}: use the same tokenizer as your base model (leave data.tokenizer '
                        'unset; init_from brings its own).')
  return BaseModel(shape, tokenizer, hf.stacked(params))


def load_run(workdir: str) -> tuple[ConfigDict, Tokenizer]:
  """The config and tokenizer that jaxgpt.train saved in `workdir`."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise JaxgptError(f'{workdir} is not a jaxgpt run directory (no {CONFIG_FILE}). '
                      'Pass the --workdir you gave jaxgpt.train.')
  with open(config_path) as f:
    config = ConfigDict(json.load(f))
  return config, Tokenizer.load(os.path.join(workdir, TOKENIZER_FILE))


def load_params(config, tokenizer: Tokenizer, workdir: str, step: int | None = None):
  """(model, params, step) from a run's checkpoint, on a one-device mesh; a LoRA run's merged into its base."""
  model = build_model(config, tokenizer.vocab_size)
  lora_cfg = lora.settings(config)
  tx = make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  checkpointer = Checkpointer(workdir)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise JaxgptError(f'{workdir} has no checkpoint yet. Train first, or wait for the first save.')
  state = checkpointer.restore(step, abstract_state(model, tx, config.seq_len, mesh, lora_cfg=lora_cfg))
  checkpointer.close()
  if lora_cfg is None:
    return model, state.params, step
  base = hf.params_in_layout(load_base(config).params, config.model.scan_layers)
  return model, lora.merge(base, state.params, lora_cfg), step
