"""tools/: plan.py's memory, time and cost figures and the MFU peaks, checked by hand. (tools/sweep.py runs as
docs/performance.md and docs/experiments.md show it, in tests/test_docs.py, and in tests/test_experiments.py.)"""

import os
import sys

import pytest

from conftest import REPO
from jaxgpt.config import JaxgptError


# --- tools/plan.py: memory per device, by hand -------------------------------------------------


def _plan_module():
  sys.path.insert(0, os.path.join(REPO, 'tools'))
  import plan
  return plan


def _small_llama(tiny_config, mesh: dict):
  from conftest import apply_overrides
  config = apply_overrides(tiny_config, {'model.num_heads': 4, 'model.num_kv_heads': 2, 'model.embed_dim': 64,
                                         'model.max_len': 64, 'batch_size': 8})
  config.mesh.update(mesh)
  return config


def test_plan_counts_the_kv_cache_of_keys_and_values_split_over_batch_and_kv_heads(tiny_config):
  plan = _plan_module()
  config = _small_llama(tiny_config, {'data': 8, 'fsdp': 1, 'tensor': 1})  # training's mesh: not serving's
  # Serving on 8 devices with --mesh.tensor=2: rows over fsdp=4, kv heads over tensor=2.
  # 2 (key, value) x 2 layers x 4 rows x 32 tokens x 2 kv heads x 16 head dims x 2 bytes (bf16) = 32 KiB in all,
  # 4 KiB per device.
  p = plan.plan(config, 8, infer_tensor=2, infer_batch=4, infer_context=32)
  assert p['infer_mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert p['dtype'] == 'bfloat16' and p['kv_cache_bytes'] == 4096
  # 16 rows: 4 per device. One row cannot be split: each device holds a (padded) row.
  assert plan.plan(config, 8, infer_tensor=2, infer_batch=16, infer_context=32)['kv_cache_bytes'] == 4 * 4096
  assert plan.plan(config, 8, infer_tensor=2, infer_batch=1, infer_context=32)['kv_cache_bytes'] == 4096
  # Context defaults to model.max_len (64).
  assert plan.plan(config, 8, infer_tensor=2, infer_batch=4)['kv_cache_bytes'] == 2 * 4096
  # On one device it holds all of it.
  assert plan.plan(config, 8, infer_devices=1, infer_batch=4, infer_context=32)['kv_cache_bytes'] == 8 * 4096


def test_plan_holds_serving_parameters_in_the_compute_dtype_on_the_serving_mesh(tiny_config):
  plan = _plan_module()
  config = _small_llama(tiny_config, {'data': 1, 'fsdp': 4, 'tensor': 2})
  p = plan.plan(config, 8, infer_tensor=2)  # serving's mesh is training's here: (1, 4, 2)
  assert p['infer_param_bytes'] * 2 == p['param_bytes']  # bf16 beside float32, the same shards
  config.model.dtype = 'float32'
  assert plan.plan(config, 8, infer_tensor=2)['infer_param_bytes'] == p['param_bytes']
  config.model.dtype = 'auto'
  # Served on one device, it holds every parameter, whatever the training mesh.
  assert plan.plan(config, 8, infer_devices=1)['infer_param_bytes'] == p['params'] * 2


def test_plan_spans_slices_and_rejects_a_context_beyond_the_model(tiny_config):
  plan = _plan_module()
  config = _small_llama(tiny_config, {'data': 1, 'fsdp': -1, 'tensor': 1})
  assert plan.plan(config, 8, num_slices=2)['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  with pytest.raises(JaxgptError, match='--infer_context=65 between 1 and model.max_len=64'):
    plan.plan(config, 8, infer_context=65)


def test_plan_times_and_prices_training_by_the_mfu_formula(tiny_config):
  plan = _plan_module()
  # 1B tokens of 800 MFLOPs at 40% of one TPU v5e (197 TFLOP/s): 1e9 * 8e8 / 7.88e13 = 10,152 s; at $2.00 an hour.
  t = plan.training_time(124e6, 8e8, 1, 'TPU v5e', 0.4, tokens=1e9, price_per_hour=2.0)
  assert t['flops'] == 8e17 and t['seconds'] == pytest.approx(10152.284, rel=1e-6)
  assert t['cost'] == pytest.approx(10152.284 / 3600 * 2.0, rel=1e-6)
  # Chinchilla's 20 tokens per parameter by default; 8 devices share the time and not the device-hours; the table's
  # price for the kind (H100, 989 TFLOP/s).
  p = plan.plan(tiny_config, 8)
  t = plan.training_time(p['params'], p['flops_per_token'], 8, 'H100', 0.5)
  assert t['tokens'] == 20 * p['params']
  assert t['seconds'] == pytest.approx(20 * p['params'] * p['flops_per_token'] / (0.5 * 8 * 989e12))
  assert t['cost'] == pytest.approx(t['seconds'] * 8 / 3600 * plan.PRICE_PER_HOUR['H100'])
  assert plan.training_time(p['params'], p['flops_per_token'], 8, 'TPU7x', 0.5)['cost'] is None  # no price listed
  with pytest.raises(JaxgptError, match='--mfu=40 must be a fraction'):
    plan.training_time(p['params'], p['flops_per_token'], 8, 'H100', 40)


def test_usable_memory_is_what_jax_may_allocate(monkeypatch):
  plan = _plan_module()
  for name in ('XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    monkeypatch.delenv(name, raising=False)
  assert plan.usable_fraction('H100')[0] == 0.75  # JAX preallocates 75% of a GPU by default
  assert plan.usable_fraction('TPU v5e')[0] == 0.9
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '.95')
  assert plan.usable_fraction('H100')[0] == 0.95
  monkeypatch.setenv('XLA_CLIENT_MEM_FRACTION', '.5')  # the newer name wins
  assert plan.usable_fraction('H100')[0] == 0.5


# --- the peak FLOP/s behind MFU --------------------------------------------------------------------


@pytest.mark.parametrize('kind,tflops', [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H100 NVL', 835), ('NVIDIA H200', 989),
    ('NVIDIA H200 NVL', 835), ('NVIDIA B200', 2250), ('NVIDIA A100-SXM4-80GB', 312), ('TPU v5 lite', 197),
    ('TPU v5', 459), ('TPU v6 lite', 918), ('TPU7x', 2307),
])
def test_each_device_kind_gets_its_own_data_sheet_peak(kind, tflops):
  from jaxgpt.metrics import data_sheet_peak
  assert data_sheet_peak(kind) == tflops * 1e12


def test_a_measured_peak_is_divided_only_among_fake_cpu_devices():
  from jaxgpt.metrics import data_sheet_peak, measured_peak_per_device, model_flops_utilization
  assert data_sheet_peak('cpu') is None and data_sheet_peak('NVIDIA X1') is None
  # An unknown GPU's matmul ran on that GPU alone: eight of them do not make each one 8x slower.
  assert measured_peak_per_device(800e12, 'gpu', 8) == 800e12
  # Eight fake CPU devices share the cores that ran the matmul.
  assert measured_peak_per_device(800e9, 'cpu', 8) == 100e9
  # 1M FLOPs/token at 240k tokens/s over 8 devices of 100 GFLOP/s: 30%.
  assert model_flops_utilization(1e6, 240e3, 100e9, 8) == pytest.approx(0.3)
