"""Loading a model for inference: a run's parameters on a mesh (a LoRA run merged into its base), or a base model.

Sample, evaluate, serve and convert load through `load`. It reads the parameters alone from a
checkpoint (an Orbax partial restore: the optimizer state, twice the parameters with Adam, is never
read) straight onto the shardings the logical rules give them on a mesh of the local devices, and
casts them to the compute dtype as they are read. By default the mesh is FSDP over every device, so
each device holds 1/N of the weights; `--mesh.data`, `--mesh.fsdp` and `--mesh.tensor` choose
another (`define_mesh_flags`). Training loads a base model (`config.init_from`) through `load_base`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from absl import flags
from jax.sharding import Mesh

from jaxgpt import hf, lora, paths, sharding
from jaxgpt.checkpoint import STATED_SHAPE_FIELDS, Checkpointer
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer, from_config
from jaxgpt.model import GPT, ModelConfig, build_model
from jaxgpt.run_dir import load_run
from jaxgpt.state import abstract_state

# Every weight split over all devices (FSDP), the batch too: what fits the largest model.
DEFAULT_MESH = {'data': 1, 'fsdp': -1, 'tensor': 1}
DTYPES = ('auto', 'float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A run ready for inference: its model, its parameters on `mesh`, and the checkpoint step they are from."""
  model: GPT
  params: dict
  step: int
  mesh: Mesh
  rules: tuple

  def activation_rules(self):
    """The context the model runs in on `mesh`: sampling places its batch and KV cache by it."""
    return sharding.activation_rules(self.mesh, self.rules)


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """What `config.init_from` names: the model fields that shape it, its tokenizer and its params."""
  shape: dict
  tokenizer: Tokenizer
  params: dict  # layers stacked, as nn.scan keeps them


def make_mesh(sizes: dict | None = None, devices=None) -> Mesh:
  """A mesh over `devices` (default: this process's) with DEFAULT_MESH's sizes, or those given."""
  return sharding.make_mesh({**DEFAULT_MESH, **(sizes or {})}, jax.local_devices() if devices is None else devices)


def define_mesh_flags() -> None:
  """The inference commands' --mesh.data, --mesh.fsdp, --mesh.tensor (read back by `mesh_flags`) and --dtype flags."""
  for axis in sharding.MESH_AXES:
    flags.DEFINE_integer(f'mesh.{axis}', DEFAULT_MESH[axis], f'Devices along the mesh\'s {axis} axis; -1 takes '
                         'what the others leave (docs/sharding.md). The default splits every weight over all devices.')
  flags.DEFINE_enum('dtype', None, DTYPES, "The parameters' and computation's dtype (default: the run's "
                    "model.dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU).")


def mesh_flags() -> dict:
  return {axis: flags.FLAGS[f'mesh.{axis}'].value for axis in sharding.MESH_AXES}


def load(config, tokenizer: Tokenizer, workdir: str, step: int | None = None, *, mesh: Mesh | None = None,
         dtype: str | None = None) -> Loaded:
  """The run's parameters from checkpoint `step` (default: the newest), sharded on `mesh` (default: `make_mesh()`).

  They come in the model's compute dtype: the run's model.dtype, or `dtype` ('auto', 'float32' or
  'bfloat16'), which sets the computation's too. A LoRA run's adapters are read the same way and
  merged into its base model on the mesh.
  """
  if dtype is not None:
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
  model = build_model(config, tokenizer.vocab_size)
  mesh = make_mesh() if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh)
  lora_cfg = lora.settings(config)
  dtype = jnp.dtype(model.cfg.dtype)
  # The parameters' shapes and shardings; no optimizer is built, as its state is never read.
  params_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                             abstract_state(model, optax.identity(), config.seq_len, mesh, rules).params)
  sharding.check_shardable(params_like, f'Choose --mesh.* sizes that divide these dimensions (mesh '
                           f'{dict(mesh.shape)} now), e.g. a smaller --mesh.tensor.')
  with Checkpointer(workdir) as checkpointer:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise JaxgptError(f'{workdir} has no checkpoint yet. Train first, or wait for the first save.')
    if lora_cfg is None:
      return Loaded(model, checkpointer.restore_params(step, params_like), step, mesh, rules)
    adapters = checkpointer.restore_params(
        step, abstract_state(model, optax.identity(), config.seq_len, mesh, rules, lora_cfg).params)
  base = hf.params_in_layout(load_base(config).params, config.model.scan_layers)
  shardings = jax.tree.map(lambda x: x.sharding, params_like)
  merge = jax.jit(lambda base, adapters: jax.tree.map(lambda x: x.astype(dtype), lora.merge(base, adapters, lora_cfg)),
                  out_shardings=shardings)
  return Loaded(model, merge(sharding.put_global(base, shardings), adapters), step, mesh, rules)


def load_base(config) -> BaseModel:
  """The base model at config.init_from (HF directory or jaxgpt run) in float32, checked against the config."""
  path = paths.expand(config.init_from)
  if hf.is_hf_directory(path):
    fields, tokenizer, params = hf.load_hf(path)
  else:
    base_config, tokenizer = load_run(path)
    fields = base_config.model.to_dict()
    base = load(base_config, tokenizer, path, mesh=make_mesh(devices=jax.local_devices()[:1]), dtype='float32')
    params = jax.device_get(base.params)
  # A run written before a field existed computed with its default.
  fields = {**{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in hf.IMPORTED_FIELDS}, **fields}
  shape = {k: fields[k] for k in STATED_SHAPE_FIELDS + (('rope_theta',) if fields['position'] == 'rope' else ())}
  diffs = [f'{k}: base {v}, config {config.model[k]}' for k, v in shape.items() if config.model[k] != v]
  if diffs:
    raise JaxgptError(f'the base model at init_from={path} has another shape than config.model ({"; ".join(diffs)}). '
                      'Set config.model to the base model\'s shape (configs/finetune_gpt2.py does for GPT-2).')
  # The rest of the architecture (RoPE scaling, extra biases, parallel residual, window...) is the base's
  # by definition: taken from it, so that nothing trains another model than the base's.
  for k in hf.IMPORTED_FIELDS:
    if k not in shape:
      config.model[k] = fields[k]
  wanted = from_config(config.data.tokenizer)
  if wanted is not None and wanted.fingerprint != tokenizer.fingerprint:
    raise JaxgptError(f'data.tokenizer.path={config.data.tokenizer.path!r} is not the tokenizer of the base model '
                      f'at init_from={path}: use the same tokenizer as your base model (leave data.tokenizer '
                      'unset; init_from brings its own).')
  return BaseModel(shape, tokenizer, hf.stacked(params))
