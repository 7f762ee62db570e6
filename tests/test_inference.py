"""Inference on the mesh: a trained run loaded (parameters only) and decoded on meshes of 8 fake CPU devices,
and evaluated by two processes as by one."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ['fsdp8', 'fsdp4_tensor2', 'data2_fsdp2_tensor2']
# The tiny run (conftest.TINY_OVERRIDES): its parameters without an embed (model width) dimension, which
# FSDP does not split: the query/key/value biases [layers, heads, head_dim] and the MLP's first bias.
NOT_SPLIT_BY_FSDP = {'blocks/query_bias', 'blocks/key_bias', 'blocks/value_bias', 'blocks/mlp_up_bias'}


@pytest.fixture(scope='module')
def meshes(trained_run, tmp_path_factory):
  result = subprocess.run([sys.executable, os.path.join(HERE, 'inference_mesh.py'), trained_run,
                           str(tmp_path_factory.mktemp('inference_mesh'))],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', MESHES)
def test_decoding_on_a_mesh_gives_the_tokens_and_log_probabilities_of_one_device(meshes, mesh):
  one = meshes['one']
  # A 10-step model's greedy continuation repeats a token; the sampled rows' vary, and follow the logits closely.
  assert all(len(set(tokens)) > 6 for tokens in one['tokens'][1:]), one['tokens']
  assert meshes[mesh]['tokens'] == one['tokens'] and all(len(t) == 12 for t in one['tokens']), one['tokens']
  for theirs, ours in zip(meshes[mesh]['log_probs'], one['log_probs']):
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)
  assert meshes[mesh]['dtype'] == 'float32'  # the run's model.dtype 'auto', on CPU


def test_the_kv_cache_is_split_over_the_batch_and_kv_heads(meshes):
  # A layer's keys, [rows, kv heads, slots, head dim] (model.CACHE_AXES): rows over data x fsdp, kv heads over tensor.
  assert meshes['one']['cache_shape'] == meshes['one']['cache_shard_shape'] == [8, 2, 16, 32]
  assert meshes['fsdp8']['cache_shard_shape'] == [1, 2, 16, 32]
  assert meshes['fsdp4_tensor2']['cache_shard_shape'] == [2, 1, 16, 32]
  assert meshes['data2_fsdp2_tensor2']['cache_shard_shape'] == [2, 1, 16, 32]


def test_fsdp8_puts_an_eighth_of_the_parameters_on_each_device(meshes):
  sizes = meshes['fsdp8_bytes']
  assert set(NOT_SPLIT_BY_FSDP) < set(sizes) and len(sizes) == 20
  for name, (on_device, whole) in sizes.items():
    assert on_device == (whole if name in NOT_SPLIT_BY_FSDP else whole // 8), name
  total = sum(whole for _, whole in sizes.values())
  replicated = sum(sizes[name][1] for name in NOT_SPLIT_BY_FSDP)
  assert total == 4 * 136_960 and replicated == 4 * 896  # float32 parameters of the tiny GPT-2
  assert sum(on_device for on_device, _ in sizes.values()) == (total - replicated) // 8 + replicated


def test_loading_for_inference_reads_no_optimizer_state(meshes):
  """Every byte of Adam's moments in a copy of the checkpoint is overwritten: the run still loads for
  inference, with the same parameters, while restoring the whole train state fails on them."""
  damaged = meshes['damaged_optimizer']
  assert damaged['damaged_bytes'] > damaged['param_bytes'], damaged  # both moments, compressed a little
  assert damaged['params_equal_intact'], damaged
  assert damaged['whole_restore'].startswith('DamagedCheckpoint'), damaged


def test_a_lora_run_is_merged_on_the_mesh(meshes):
  lora = meshes['lora']
  assert lora['query_change'] > 0.1  # the adapters really change the kernels
  for mesh in ('one', 'fsdp4_tensor2'):
    assert lora[mesh]['step'] == 3 and lora[mesh]['max_difference_from_direct'] < 1e-5, lora


def test_bfloat16_parameters_compute_close_to_float32(meshes):
  bf16, f32 = meshes['bf16'], meshes['one']
  assert bf16['dtype'] == 'bfloat16'
  difference = max(abs(a - b) for row_a, row_b in zip(bf16['log_probs'], f32['log_probs'])
                   for a, b in zip(row_a, row_b))
  assert 0 < difference < 0.1, difference  # rounded to bf16's 8 bits, not float32's


def test_a_mesh_that_does_not_divide_the_model_is_one_clear_error(meshes):
  message = meshes['bad_mesh']
  assert message.startswith('the mesh does not divide the model: blocks/') and 'split 8 ways over tensor' in message
  assert 'Choose --mesh.* sizes' in message


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_evaluate_like_one(trained_run, tmp_path):
  """jaxgpt.evaluate as two processes (gloo, two devices each, FSDP over all four) and in this process on one
  device: the same held-out figures and the same greedy samples."""
  from jaxgpt.evaluate import evaluate
  alone, together = tmp_path / 'alone', tmp_path / 'together'
  for copy in (alone, together):
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns('eval', 'tensorboard'))
  port = _free_port()
  args = [sys.executable, '-m', 'jaxgpt.evaluate', '--workdir', str(together), '--max_new_tokens=8',
          f'--distributed.coordinator_address=127.0.0.1:{port}', '--distributed.num_processes=2']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen(args + [f'--distributed.process_id={i}'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  evaluate(str(alone), max_new_tokens=8)
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  assert 'bits per byte' in outputs[0][0] and 'bits per byte' not in outputs[1][0]  # process 0 reports
  read = lambda run, name: (run / 'eval' / 'step_10' / name).read_text()
  one, two = json.loads(read(alone, 'results.json')), json.loads(read(together, 'results.json'))
  assert one['tokens'] == two['tokens'] > 0 and one['bytes'] == two['bytes']
  for name in ('loss', 'perplexity', 'bits_per_byte'):
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, err_msg=name)
  assert read(alone, 'samples.jsonl') == read(together, 'samples.jsonl')
