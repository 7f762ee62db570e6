"""Shared fixtures: a tiny config on a small slice of the standard library's source.

Tests that need several (fake) devices or several processes run in a
subprocess, because XLA_FLAGS must be set before jax initialises.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import quickstart  # noqa: E402

# Small enough to train a step in well under a second on 2 CPU cores.
GPT2_ARCHITECTURE = {'model.position': 'learned', 'model.norm': 'layernorm', 'model.mlp': 'gelu',
                     'model.use_bias': True}

TINY_OVERRIDES = {
    'seq_len': 64,
    'batch_size': 8,
    'data.max_docs': 80,
    'data.vocab_size': 512,
    'model.num_layers': 2,
    'model.num_heads': 2,
    'model.embed_dim': 64,
    'model.mlp_dim': 256,
    'model.max_len': 64,
    'optim.warmup_steps': 5,
    'train.num_steps': 20,
    'train.log_every': 5,
    'train.eval_every': 10,
    'train.eval_batches': 2,
    'train.checkpoint_every': 10,
    'train.peak_flops_per_device': 1e11,  # skip the matmul measurement in tests
    'sample.max_new_tokens': 8,
    # GPT-2 blocks, whatever architecture the quickstart settles on: tests of other parts rely on it.
    **GPT2_ARCHITECTURE,
}


LLAMA_OPTIONS = dict(position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False, tie_embeddings=False,
                     num_kv_heads=2)


def architecture_variants(base) -> dict:
  """Each architecture option of ModelConfig on its own, and all together (Llama-style)."""
  return {
      'gpt2': base,
      'rope': dataclasses.replace(base, position='rope'),
      'rmsnorm': dataclasses.replace(base, norm='rmsnorm'),
      'swiglu': dataclasses.replace(base, mlp='swiglu'),
      'gqa': dataclasses.replace(base, num_kv_heads=2),
      'mqa_no_bias_untied': dataclasses.replace(base, num_kv_heads=1, use_bias=False, tie_embeddings=False),
      'llama': dataclasses.replace(base, **LLAMA_OPTIONS),
  }


def apply_overrides(config, overrides: dict):
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def override_args(overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='session')
def data_cache(tmp_path_factory):
  """One data cache for the whole session: the tokenizer and dataset are built once."""
  return str(tmp_path_factory.mktemp('data_cache'))


@pytest.fixture
def tiny_config(data_cache):
  config = apply_overrides(quickstart.get_config(), TINY_OVERRIDES)
  config.data.cache_dir = data_cache
  return config


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300):
  """Runs `python -m module args` and returns the CompletedProcess (never raises on failure)."""
  full_env = {**os.environ, **(env or {})}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, data_cache):
  """A tiny run trained for 10 steps, shared by the evaluate and serve tests."""
  from jaxgpt.train import train
  config = apply_overrides(quickstart.get_config(), {**TINY_OVERRIDES, 'train.num_steps': 10})
  config.data.cache_dir = data_cache
  workdir = str(tmp_path_factory.mktemp('trained_run'))
  train(config, workdir)
  return workdir


@pytest.fixture(scope='session')
def command_runs(request, tmp_path_factory):
  """The docs' commands (tests/test_docs.py) run in their sandboxes, continued by tests/test_end_to_end.py's steps.

  Started once, in the background, two flows at a time; a test waits for the flow it reads. The
  end-to-end steps run only when that module's tests were collected.
  """
  import test_docs
  chains = {}
  if any(getattr(getattr(item, 'module', None), '__name__', '') == 'test_end_to_end' for item in request.session.items):
    import test_end_to_end
    chains = test_end_to_end.CHAINS
  runs = test_docs.CommandRuns(str(tmp_path_factory.mktemp('commands')), chains)
  yield runs
  runs.close()
