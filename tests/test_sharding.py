"""Sharded training equals one device: 8 fake CPU devices in a subprocess."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxgpt import sharding
from jaxgpt.config import JaxgptError

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def runs():
  result = subprocess.run([sys.executable, os.path.join(HERE, 'sharded_losses.py')],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', ['data8', 'fsdp8', 'fsdp4_tensor2', 'data2_fsdp2_tensor2'])
def test_sharded_training_matches_one_device(runs, mesh):
  np.testing.assert_allclose(runs[mesh]['losses'], runs['single']['losses'], rtol=1e-5)
  np.testing.assert_allclose(runs[mesh]['params'], runs['single']['params'], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('mesh', ['single', 'data8', 'fsdp4_tensor2', 'data2_fsdp2_tensor2'])
def test_checkpoint_from_one_mesh_resumes_on_another(runs, mesh):
  """Saved after 3 steps on fsdp8, restored (resharded) onto `mesh`: step 4 is the uninterrupted step 4."""
  np.testing.assert_allclose(runs[mesh]['fourth_loss_from_fsdp8_checkpoint'], runs['fsdp8']['fourth_loss'],
                             rtol=1e-6)
  np.testing.assert_allclose(runs[mesh]['fourth_loss_from_fsdp8_checkpoint'], runs['single']['fourth_loss'],
                             rtol=1e-5)


def test_splash_attention_runs_per_shard_and_matches_xla(runs):
  """On data2 x fsdp2 x tensor2 the Pallas kernel runs under shard_map, on packed rows."""
  np.testing.assert_allclose(runs['attention']['splash'], runs['attention']['xla'], rtol=1e-5)


def test_fsdp_and_tensor_parallelism_really_split_the_parameters(runs):
  # query kernel: [layers, embed, heads, head_dim]; embed goes to fsdp, heads to tensor.
  assert runs['single']['query_shard_shape'] == [2, 64, 4, 16]
  assert runs['data8']['query_shard_shape'] == [2, 64, 4, 16]
  assert runs['fsdp8']['query_shard_shape'] == [2, 8, 4, 16]
  assert runs['fsdp4_tensor2']['query_shard_shape'] == [2, 16, 2, 16]
  assert runs['fsdp4_tensor2']['adam_mu_shard_shape'] == [2, 16, 2, 16]  # optimizer state too


@pytest.mark.parametrize('mesh,devices,message', [
    ({'data': 3, 'fsdp': 1, 'tensor': 1}, 8, 'needs 3 devices but 8 are available'),
    ({'data': -1, 'fsdp': 3, 'tensor': 1}, 8, 'does not divide the 8 devices'),
    ({'data': -1, 'fsdp': -1, 'tensor': 1}, 8, 'at most one -1'),
])
def test_bad_mesh_shapes_are_clear_errors(mesh, devices, message):
  with pytest.raises(JaxgptError, match=message):
    sharding.mesh_shape(mesh, devices)


def test_mesh_fills_the_minus_one_axis():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize('overrides,sizes,message', [
    ({'batch_size': 12}, {'data': 8, 'fsdp': 1, 'tensor': 1}, 'microbatches of 12, not divisible by the data-parallel size 8'),
    ({'batch_size': 16, 'optim.grad_accum_steps': 4}, {'data': 2, 'fsdp': 4, 'tensor': 1},
     'microbatches of 4, not divisible by the data-parallel size 8'),
    ({'model.num_heads': 4, 'model.num_kv_heads': 1}, {'data': 4, 'fsdp': 1, 'tensor': 2}, 'the kv heads (1)'),
    ({'model.num_heads': 6}, {'data': 1, 'fsdp': 1, 'tensor': 4}, 'mesh.tensor=4 must divide model.num_heads=6'),
])
def test_shapes_that_do_not_divide_are_clear_errors(tiny_config, overrides, sizes, message):
  from conftest import apply_overrides
  config = apply_overrides(tiny_config, overrides)
  with pytest.raises(JaxgptError, match=re.escape(message)):
    sharding.check_divisibility(config, sizes)


def test_rules_can_be_overridden_from_config(tiny_config):
  tiny_config.mesh.rules = (('vocab', None), ('embed', ['fsdp', 'data']))
  rules = dict(sharding.logical_rules(tiny_config.mesh))
  assert rules['vocab'] is None and rules['embed'] == ('fsdp', 'data') and rules['heads'] == 'tensor'
  tiny_config.mesh.rules = (('vocabulary', None),)
  with pytest.raises(JaxgptError, match="unknown logical axes \\['vocabulary'\\]"):
    sharding.logical_rules(tiny_config.mesh)
