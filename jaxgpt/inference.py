"""Loading a model for inference: a run's parameters (a LoRA run merged into its base), or a base model.

Sample, evaluate, serve and convert load through here; training loads a base
model (`config.init_from`) through `load_base` too.
"""

import dataclasses
import os

import jax

from jaxgpt import hf, lora, sharding
from jaxgpt.checkpoint import PARAM_SHAPE_FIELDS, Checkpointer
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer, load_byte_level_bpe
from jaxgpt.model import build_model
from jaxgpt.optim import make_optimizer
from jaxgpt.run_dir import load_run
from jaxgpt.state import abstract_state


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
