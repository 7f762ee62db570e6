"""Sharded training equals one device: 8 fake CPU devices in a subprocess."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
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


# --- several slices (TPU multi-slice, GPU hosts) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeTpuChip:
  """What jax's mesh utilities read of a device: its slice, its place in the slice's torus (TPU), its kind."""
  id: int
  slice_index: int
  coords: tuple
  process_index: int = 0
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


def two_v4_16_slices() -> list:
  """Two slices of 8 chips, each a 2x2x2 torus, in jax.devices() order (slice by slice)."""
  return [FakeTpuChip(id=8 * s + i, slice_index=s, coords=(i % 2, i // 2 % 2, i // 4), process_index=2 * s + i // 4)
          for s in range(2) for i in range(8)]


def test_by_default_the_batch_is_split_across_slices_and_fsdp_stays_inside_one():
  devices = two_v4_16_slices()
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)  # dcn_data defaults to -1
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 8, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  for data_index in range(2):  # each data-parallel replica is one whole slice
    assert sorted(d.id for d in mesh.devices[data_index].flat) == list(range(8 * data_index, 8 * data_index + 8))


def test_fsdp_can_span_slices_with_the_tensor_axis_inside_each():
  devices = two_v4_16_slices()
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2, 'dcn_data': 1, 'dcn_fsdp': 2}, devices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 8, 'tensor': 2}
  grid = mesh.devices[0]  # fsdp x tensor
  assert [{d.slice_index for d in grid[j]} for j in range(8)] == [{0}] * 4 + [{1}] * 4
  assert len({d.id for d in grid.flat}) == 16


def test_gpu_hosts_are_slices_one_process_per_gpu():
  """JAX gives each host's GPUs one slice number: 2 hosts x 8 GPUs, a process each, as SLURM starts them."""
  devices = [FakeTpuChip(id=8 * host + gpu, slice_index=host, coords=(), process_index=8 * host + gpu,
                         platform='gpu', device_kind='NVIDIA H100 80GB HBM3') for host in range(2) for gpu in range(8)]
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 8, 'tensor': 1}
  assert [sorted(d.process_index for d in mesh.devices[h].flat) for h in range(2)] == [
      list(range(8)), list(range(8, 16))]


@pytest.mark.parametrize('mesh,message', [
    ({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1}, 'mesh (dcn_data=1, dcn_fsdp=1) needs 1 slices but 2 are available'),
    ({'data': 1, 'fsdp': 16, 'tensor': 1}, 'mesh (data=1, fsdp=16, tensor=1) needs 16 devices but 8 are available in each slice'),
    ({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': -1, 'dcn_fsdp': 3}, 'does not divide the 2 slices'),
])
def test_meshes_that_do_not_fit_the_slices_are_clear_errors(mesh, message):
  with pytest.raises(JaxgptError, match=re.escape(message)):
    sharding.make_mesh(mesh, two_v4_16_slices())


def test_mesh_shape_multiplies_the_shape_within_a_slice_by_the_slices():
  assert sharding.slice_shapes({'data': 1, 'fsdp': -1, 'tensor': 2}, 64, num_slices=4) == ((1, 8, 2), (4, 1, 1))
  assert sharding.mesh_shape({'data': 1, 'fsdp': -1, 'tensor': 2}, 64, num_slices=4) == (4, 8, 2)
  assert sharding.mesh_shape({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 2, 'dcn_fsdp': -1}, 64, 4) == (2, 32, 1)
