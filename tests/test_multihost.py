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
  for result in multi:
    np.testing.assert_allclose(result['after_restore'], single['after_restore'], rtol=1e-6)
  assert os.path.isdir(root / 'multi' / 'checkpoints' / '3' / 'state')
