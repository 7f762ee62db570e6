"""Two local processes (gloo collectives on 127.0.0.1) train as one job."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(num_processes: int, checkpoint_dir: str) -> list[dict]:
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'multihost_losses.py'), str(i),
                             str(num_processes), port, checkpoint_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  return _launch(1, str(root / 'single')), _launch(2, str(root / 'multi')), root


def test_two_processes_train_like_one(runs):
  (single,), multi, _ = runs
  assert [r['process'] for r in multi] == [0, 1] and all(r['devices'] == 4 for r in multi)
  for result in multi:
    np.testing.assert_allclose(result['losses'], single['losses'], rtol=1e-6)


def test_two_processes_save_and_restore_one_checkpoint(runs):
  (single,), multi, root = runs
  for result in [single, *multi]:
    # Restored, the state is the one saved, not a fresh one: 3 steps on random tokens moved this loss by
    # about 7e-5 of itself, far beyond the rtol.
    np.testing.assert_allclose(result['after_restore'], result['uninterrupted'], rtol=1e-6)
    assert abs(result['untrained'] - result['uninterrupted']) > 2e-5 * result['untrained']
    np.testing.assert_allclose(result['after_restore'], single['after_restore'], rtol=1e-6)
  assert os.path.isdir(root / 'multi' / 'checkpoints' / '3' / 'state')


def test_train_command_with_two_processes(tmp_path, data_cache):
  """The real CLI as two processes: only process 0 logs; each saves its own data position; one
  process can take the run over."""
  from conftest import REPO, TINY_OVERRIDES, override_args
  port = _free_port()
  args = [sys.executable, '-m', 'jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', str(tmp_path / 'run'),
          *override_args(TINY_OVERRIDES), '--config.train.num_steps=10', f'--config.data.cache_dir={data_cache}',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}', '--config.distributed.num_processes=2']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen(args + [f'--config.distributed.process_id={i}'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  (out0, _), (out1, _) = outputs
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out0
  assert 'step 10/10 | loss' in out0 and 'step 10: validation loss' in out0
  assert 'step 10/10' not in out1 and 'validation loss' not in out1
  data_state = sorted(os.listdir(tmp_path / 'run' / 'checkpoints' / '10' / 'data'))
  assert 'process_0-of-2.json' in data_state and 'process_1-of-2.json' in data_state

  # Resumed by one process (a smaller slice after a preemption): the state restores, the data
  # order starts a new shuffle, with a warning saying so.
  one_process = [a for a in args if not a.startswith('--config.distributed')] + ['--config.train.num_steps=14']
  single = subprocess.run(one_process, cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert single.returncode == 0, single.stderr[-3000:]
  assert 'resumed from step 10' in single.stdout and 'step 14/14 | loss' in single.stdout
  assert 'warning: step 10 was saved by 2 processes and this run has 1' in single.stdout
  assert 'process_0-of-1.json' in os.listdir(tmp_path / 'run' / 'checkpoints' / '14' / 'data')


def test_sigterm_to_two_processes_saves_one_agreed_step(tmp_path, data_cache):
  """Preemption of a two-process job: both stop at the same step, save it together and exit 0."""
  import signal
  import time
  from conftest import REPO, TINY_OVERRIDES, override_args
  workdir = tmp_path / 'run'
  port = _free_port()
  args = [sys.executable, '-m', 'jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
          *override_args(TINY_OVERRIDES), '--config.train.num_steps=1000', '--config.train.log_every=1',
          '--config.train.checkpoint_every=1000', f'--config.data.cache_dir={data_cache}',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}', '--config.distributed.num_processes=2']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen(args + [f'--config.distributed.process_id={i}'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    time.sleep(0.5)
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=240) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  assert 'stopped by' in outputs[0][0]
  steps = [name for name in os.listdir(workdir / 'checkpoints') if name.isdigit()]
  assert len(steps) == 1 and 3 <= int(steps[0]) < 1000
  assert sorted(os.listdir(workdir / 'checkpoints' / steps[0] / 'data'))[-2:] == [
      'process_0-of-2.json', 'process_1-of-2.json']
