"""Every config in configs/ loads, validates and builds; the planning tool's arithmetic holds."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_module
from jaxgpt.config import validate
from jaxgpt.model import GPT, ModelConfig, num_params

CONFIGS = os.path.join(REPO, 'configs')


def load(name: str, *args):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _param_count(config) -> int:
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  return num_params(jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))))


@pytest.mark.parametrize('name,args,millions', [
    ('quickstart', (), 1.28), ('llama_tiny', (), 5.05), ('web_text', (), 4.2),
    ('gpt2', ('small',), 124.5), ('gpt2', ('medium',), 354.9), ('gpt2', ('large',), 774.1),
    ('gpt2', ('xl',), 1557.7), ('llama_1b', (), 1104.2),
])
def test_config_validates_and_has_the_intended_size(name, args, millions):
  config = load(name, *args)
  if config.data.source != 'stdlib':
    config.data.path = '/data/corpus'
  validate(config)
  assert abs(_param_count(config) / 1e6 - millions) < 0.05


def test_every_config_file_is_covered():
  assert {f[:-3] for f in os.listdir(CONFIGS) if f.endswith('.py')} == {
      'quickstart', 'gpt2', 'llama_tiny', 'llama_1b', 'web_text',
      'finetune_gpt2', 'sft_alpaca',  # exercised by tests/test_finetune.py
      'lora',  # exercised by tests/test_lora.py
      'dpo',  # exercised by tests/test_preference.py
      'chat', 'content', 'codegen', 'summarization', 'qa', 'sentiment',  # trained by docs/recipes.md's commands
      'mixture'}  # exercised by tests/test_mixture.py


def test_plan_shards_memory_by_the_mesh():
  import sys
  sys.path.insert(0, os.path.join(REPO, 'tools'))
  import plan
  config = load('gpt2', 'small')
  one = plan.plan(config, 8)
  config.mesh.update(data=1, fsdp=4, tensor=2)
  split = plan.plan(config, 8)
  assert one['params'] == split['params']
  assert abs(one['param_bytes'] - one['params'] * 4 / 8) / one['param_bytes'] < 0.01  # FSDP over 8
  assert abs(split['param_bytes'] - one['param_bytes']) / one['param_bytes'] < 0.01  # 4 x 2 is also 8
  config.mesh.update(data=8, fsdp=1, tensor=1)
  # Data parallelism replicates every parameter: a plan that divided by the device count whatever the mesh
  # would pass both checks above.
  assert plan.plan(config, 8)['param_bytes'] == one['params'] * 4
  acts = one['activation_bytes']
  assert acts['none'] > acts['dots'] > acts['full'] > 0


def test_plan_command_warns_when_it_does_not_fit():
  result = run_module('tools.plan', '--config', 'configs/gpt2.py:small', '--devices', '8',
                      '--config.optim.grad_accum_steps=1', '--device', 'TPU v5e')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'parameters      124.5M' in result.stdout and 'TPU v5e      16 GiB: DOES NOT FIT' in result.stdout
