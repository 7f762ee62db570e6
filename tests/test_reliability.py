"""Killed, stopped and damaged runs, through the real command in subprocesses.

A run killed with SIGKILL at random steps (once in the middle of a checkpoint
write) and resumed each time must produce exactly the losses and parameters of
a run never interrupted, and a second run on a workdir in use must be refused;
SIGTERM and SIGINT must save at the current step and exit 0; a damaged newest
checkpoint must be moved aside for the one before it, while a storage error that
passes (injected) must neither move nor skip it.
"""

import errno
import glob
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from conftest import REPO, TINY_OVERRIDES, override_args
from jaxgpt import checkpoint, inference, run_dir, run_lock, sharding, state as state_lib
from jaxgpt.model import build_model
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import JaxgptError
from jaxgpt.data import builder, pipeline
from jaxgpt.optim import learning_rate_schedule, make_optimizer
from jaxgpt.train import make_train_step, train

NUM_STEPS = 30
# Dropout on, so that a resumed run must also draw the same dropout masks; a metrics record
# every step; saves every 3 steps keeping only the newest (and every 9th step for good).
RUN_OVERRIDES = {**TINY_OVERRIDES, 'train.num_steps': NUM_STEPS, 'train.log_every': 1,
                 'train.eval_every': NUM_STEPS, 'train.checkpoint_every': 3, 'train.keep_checkpoints': 1,
                 'train.keep_every': 9, 'model.dropout_rate': 0.1, 'sample.prompts': '()'}


def _command(workdir, data_cache, compile_cache) -> list[str]:
  return [sys.executable, '-m', 'jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
          *override_args(RUN_OVERRIDES), f'--config.data.cache_dir={data_cache}',
          f'--config.train.compilation_cache_dir={compile_cache}']


def _start(workdir, data_cache, compile_cache) -> subprocess.Popen:
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, f'log-{time.monotonic_ns()}.txt'), 'w+')
  proc = subprocess.Popen(_command(workdir, data_cache, compile_cache), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _finish(proc, timeout=240) -> str:
  proc.wait(timeout=timeout)
  proc.log.seek(0)
  return proc.log.read()


def _records(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def _wait_until(condition, proc, what: str, timeout=240):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, f'the run ended before {what}:\n{_finish(proc)[-3000:]}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.002)


def _final_params(workdir):
  config, tokenizer = run_dir.load_run(str(workdir))
  loaded = inference.load(config, tokenizer, str(workdir))
  return loaded.step, loaded.params


def _losses(workdir) -> list[tuple[int, float]]:
  return [(r['step'], r['loss']) for r in _records(workdir)]


@pytest.fixture(scope='module')
def paths(tmp_path_factory, data_cache):
  root = tmp_path_factory.mktemp('reliability')
  return root, data_cache, root / 'xla_cache'


@pytest.fixture(scope='module')
def reference(paths):
  """The run never interrupted."""
  root, data_cache, compile_cache = paths
  proc = _start(root / 'reference', data_cache, compile_cache)
  out = _finish(proc)
  assert proc.returncode == 0, out[-3000:]
  return root / 'reference'


def _assert_same_run(workdir, reference_dir):
  assert _losses(workdir) == _losses(reference_dir)  # exact float equality, step by step
  assert [s for s, _ in _losses(workdir)] == list(range(1, NUM_STEPS + 1))
  (step, params), (reference_step, reference_params) = _final_params(workdir), _final_params(reference_dir)
  assert step == reference_step == NUM_STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_killed_runs_resume_bitwise_identically(paths, reference):
  root, data_cache, compile_cache = paths
  workdir = root / 'killed'
  checkpoints = workdir / 'checkpoints'
  rng = random.Random(0)
  # Two kills at random steps, one in the middle of a checkpoint write, then one more at random.
  plan = [rng.randrange(4, 12), 'during a save', rng.randrange(20, 26)]
  for kill_at in plan:
    proc = _start(workdir, data_cache, compile_cache)
    if kill_at == 'during a save':
      unfinished = lambda: glob.glob(f'{checkpoints}/*.orbax-checkpoint-tmp*')
      _wait_until(lambda: (_records(workdir) or [{'step': 0}])[-1]['step'] > 14 and unfinished(), proc, 'a save')
    else:
      _wait_until(lambda: (_records(workdir) or [{'step': 0}])[-1]['step'] >= kill_at, proc, f'step {kill_at}')
    committed = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    if kill_at == plan[0]:
      _assert_second_run_refused(workdir, data_cache, compile_cache, proc)
    proc.send_signal(signal.SIGKILL)  # the next start must not find the dead run's lock in its way
    out = _finish(proc)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    # Old checkpoints are deleted only after a newer one is complete: one is always there.
    assert committed and os.listdir(checkpoints), f'killed at {kill_at} with no checkpoint left'
  proc = _start(workdir, data_cache, compile_cache)
  out = _finish(proc)
  assert proc.returncode == 0, out[-3000:]
  assert 'resumed from step' in out
  assert not glob.glob(f'{checkpoints}/*tmp*'), 'the unfinished save was not cleaned up'
  # keep_checkpoints=1 plus keep_every=9
  assert sorted(os.listdir(checkpoints), key=int) == ['9', '18', '27', '30']
  _assert_same_run(workdir, reference)


def _assert_second_run_refused(workdir, data_cache, compile_cache, first):
  """The same command again, while `first` (paused, so that it cannot end meanwhile) holds the workdir."""
  first.send_signal(signal.SIGSTOP)
  checkpoints = workdir / 'checkpoints'
  saves = lambda: {name: os.path.getmtime(checkpoints / name) for name in os.listdir(checkpoints)}
  before = saves()
  second = subprocess.run(_command(workdir, data_cache, compile_cache), cwd=REPO, capture_output=True, text=True,
                          timeout=240)
  assert second.returncode == 2, second.stdout + second.stderr
  assert (f'error: --workdir {workdir} is in use by another training run (process {first.pid} on host '
          f'{socket.gethostname()}, started ') in second.stderr
  assert 'Traceback' not in second.stderr
  assert saves() == before  # refused before it touched anything, such as the first run's unfinished saves
  assert first.poll() is None


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_at_the_current_step_and_exit_0(paths, reference, signum):
  root, data_cache, compile_cache = paths
  workdir = root / signal.Signals(signum).name
  proc = _start(workdir, data_cache, compile_cache)
  _wait_until(lambda: (_records(workdir) or [{'step': 0}])[-1]['step'] >= 7, proc, 'step 7')
  proc.send_signal(signum)
  out = _finish(proc)
  assert proc.returncode == 0, out[-3000:]
  stopped_at = _records(workdir)[-1]['step']
  assert 7 <= stopped_at < NUM_STEPS
  assert (f'step {stopped_at}: stopped by {signal.Signals(signum).name}; saved a checkpoint at step {stopped_at}. '
          'Run the same command to resume.') in out
  assert str(stopped_at) in os.listdir(workdir / 'checkpoints')
  assert 'validation loss' not in out  # it stops at once: no evaluation, no samples
  assert _losses(workdir) == _losses(reference)[:stopped_at]


def test_damaged_checkpoints_are_moved_aside_for_the_newest_intact_one(paths, reference):
  root, data_cache, compile_cache = paths
  workdir = root / 'damaged'
  os.makedirs(workdir)
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl'):
    with open(reference / name, 'rb') as src, open(workdir / name, 'wb') as dst:
      dst.write(src.read())
  subprocess.run(['cp', '-r', str(reference / 'checkpoints'), str(workdir / 'checkpoints')], check=True)
  # The newest step loses the end of its biggest array file; the one before loses its data position.
  newest = max(glob.glob(f'{workdir}/checkpoints/30/state/**/d/*', recursive=True), key=os.path.getsize)
  os.truncate(newest, 10)
  os.remove(workdir / 'checkpoints' / '27' / 'data' / 'process_0-of-1.json')

  proc = _start(workdir, data_cache, compile_cache)
  out = _finish(proc)
  assert proc.returncode == 0, out[-3000:]
  assert 'warning: checkpoint step 30 is damaged (ValueError: OUT_OF_RANGE' in out
  assert 'warning: checkpoint step 27 is damaged (ValueError: File ' in out
  assert 'resumed from step 18' in out
  names = os.listdir(workdir / 'checkpoints')
  assert any(n.startswith('30.damaged-') for n in names) and any(n.startswith('27.damaged-') for n in names)
  _assert_same_run(workdir, reference)  # steps 19-30 again, exactly as before


def test_a_run_with_no_readable_checkpoint_stops_and_moves_nothing(paths, reference):
  root, data_cache, compile_cache = paths
  workdir = root / 'unreadable'
  subprocess.run(['cp', '-r', str(reference), str(workdir)], check=True)
  for step in os.listdir(workdir / 'checkpoints'):
    os.remove(workdir / 'checkpoints' / step / 'meta' / 'metadata')
  proc = _start(workdir, data_cache, compile_cache)
  out = _finish(proc)
  assert proc.returncode == 2
  assert f'error: no checkpoint in {workdir}/checkpoints can be read (step 30: ' in out
  assert 'step 9: ' in out and 'Traceback' not in out
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['9', '18', '27', '30']


def _copy_run(reference, workdir):
  subprocess.run(['cp', '-r', str(reference), str(workdir)], check=True)
  return workdir


def _restore_latest(workdir, log=print, **model_overrides):
  """(step, state) as a resumed run restores them (its data position aside), with `model_overrides` in its config."""
  config, tokenizer = run_dir.load_run(str(workdir))
  config.model.update(model_overrides)
  model = build_model(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  abstract = state_lib.abstract_state(model, make_optimizer(config.optim, config.train.num_steps), config.seq_len, mesh)
  with Checkpointer(str(workdir)) as checkpointer:
    return checkpointer.restore_latest(abstract, None, state_lib.checkpoint_meta(config, tokenizer), log)


def _fail_reads(monkeypatch, item: str, times: int) -> list:
  """Makes the first `times` reads of a step's `item` fail as storage does while it is down; returns the reads.

  'meta' or 'metrics': a JSON file read by Python, which raises OSError(EIO). 'state': a TensorStore array read,
  which raises ValueError with its status code and errno (in the form TensorStore 0.1.86 gave for a real EIO),
  and which Orbax wraps in a plain Exception.
  """
  reads = []

  def storage_error(path):
    if item != 'state':
      return OSError(errno.EIO, os.strerror(errno.EIO), str(path))
    return ValueError(f'UNKNOWN: Error reading "params/0" in OCDBT database at local file "{path}/": Error reading '
                      f'from open file {path}/d/0: Failed to read from file: Failed to read 2291 bytes from file at '
                      "offset 0: Input/output error [os_error_code='5']")

  if item != 'state':
    real = ocp.JsonCheckpointHandler.restore

    def flaky_restore(handler, directory, *args, **kwargs):
      if directory.name == item:  # Orbax reads each step's `metrics` item with it too
        reads.append(directory / 'metadata')
        if len(reads) <= times:
          raise storage_error(reads[-1])
      return real(handler, directory, *args, **kwargs)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, 'restore', flaky_restore)
  else:
    real = orbax_serialization._read_shard

    async def flaky_read(*args, **kwargs):
      reads.append('state')
      if len(reads) <= times:
        raise storage_error(reads[-1])
      return await real(*args, **kwargs)
    monkeypatch.setattr(orbax_serialization, '_read_shard', flaky_read)
  monkeypatch.setattr(checkpoint, 'RETRY_PAUSES_SECONDS', (0.01, 0.02, 0.04))
  return reads


@pytest.mark.parametrize('item', ['meta', 'state'])
def test_a_storage_error_that_passes_resumes_from_the_newest_step(paths, reference, monkeypatch, item):
  workdir = _copy_run(reference, paths[0] / f'flaky-{item}')
  reads = _fail_reads(monkeypatch, item, times=2)
  logged = []
  step, _ = _restore_latest(workdir, logged.append)
  assert step == NUM_STEPS and len(reads) > 2
  assert logged[0].startswith('warning: reading checkpoint step 30 failed (') and 'Input/output error' in logged[0]
  assert logged[0].endswith('; trying again in 0.01s.')
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['9', '18', '27', '30']


@pytest.mark.parametrize('item', ['meta', 'state'])
def test_a_storage_error_that_lasts_stops_the_run_and_moves_nothing(paths, reference, monkeypatch, item):
  workdir = _copy_run(reference, paths[0] / f'down-{item}')
  _fail_reads(monkeypatch, item, times=10 ** 6)
  logged = []
  with pytest.raises(JaxgptError) as error:
    _restore_latest(workdir, logged.append)
  message = str(error.value)
  assert message.startswith(f'checkpoint step 30 in {workdir}/checkpoints could not be read: the storage failed (')
  assert 'Input/output error' in message and '; 4 tries over 0.07s)' in message
  assert message.endswith('nothing was moved or skipped. Run the same command again when the storage is back.')
  assert len(logged) == 3 and all('reading checkpoint step 30 failed' in m for m in logged)  # never read step 27
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['9', '18', '27', '30']


def test_a_storage_error_listing_the_checkpoints_is_one_clear_error(paths, reference, monkeypatch):
  workdir = _copy_run(reference, paths[0] / 'down-listing')
  _fail_reads(monkeypatch, 'metrics', times=1)  # read for every step as the checkpoints are listed
  with pytest.raises(JaxgptError, match=re.escape(f'the checkpoints in {workdir}/checkpoints could not be read: the '
                                                  'storage failed (OSError: [Errno 5] Input/output error')):
    Checkpointer(str(workdir))


@pytest.mark.parametrize('damage, error', [('delete the state item', 'KeyError: \'Item "state" was not found'),
                                           ('write invalid JSON metadata', 'JSONDecodeError: ')])
def test_damage_that_is_not_an_io_error_is_moved_aside(paths, reference, damage, error):
  workdir = _copy_run(reference, paths[0] / damage.replace(' ', '-'))
  if damage == 'delete the state item':
    subprocess.run(['rm', '-r', str(workdir / 'checkpoints' / '30' / 'state')], check=True)
  else:
    (workdir / 'checkpoints' / '30' / 'meta' / 'metadata').write_text('{"model_shape": {"num_la')
  logged = []
  step, _ = _restore_latest(workdir, logged.append)
  assert step == 27
  assert len(logged) == 1 and logged[0].startswith(f'warning: checkpoint step 30 is damaged ({error}')
  assert any(name.startswith('30.damaged-') for name in os.listdir(workdir / 'checkpoints'))


def test_resuming_with_scan_layers_changed_names_it(paths, reference):
  workdir = _copy_run(reference, paths[0] / 'scan_layers')
  with pytest.raises(JaxgptError, match=r'has a different model shape \(scan_layers: checkpoint True, config False\)'):
    _restore_latest(workdir, scan_layers=False)
  # Checkpoints written before scan_layers was recorded were scanned (the default): they resume.
  meta_file = workdir / 'checkpoints' / '30' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  del meta['model_shape']['scan_layers']
  meta_file.write_text(json.dumps(meta))
  assert _restore_latest(workdir)[0] == NUM_STEPS
  with pytest.raises(JaxgptError, match=r'\(scan_layers: checkpoint True, config False\)'):
    _restore_latest(workdir, scan_layers=False)


def test_reading_a_run_in_training_takes_no_lock(reference):
  with run_lock.acquire(str(reference)):  # as a training run holds it
    step, _ = _final_params(reference)  # what sample, evaluate and serve load
  assert step == NUM_STEPS


def _nonfinite_config(tiny_config, on_nonfinite):
  tiny_config.optim.lr = float('inf')  # the first update is 0 * inf = NaN, the next ones inf
  tiny_config.train.update(num_steps=4, checkpoint_every=2, on_nonfinite=on_nonfinite, compilation_cache_dir='')
  tiny_config.sample.prompts = ()
  return tiny_config


def test_a_nonfinite_batch_is_not_applied(tiny_config):
  data = builder.prepare(tiny_config.data, log=lambda m: None)
  model = build_model(tiny_config, data.tokenizer.vocab_size)
  tx = make_optimizer(tiny_config.optim, 10)
  mesh = sharding.make_mesh(tiny_config.mesh)
  state = state_lib.create_state(model, tx, tiny_config.seq_len, mesh, jax.random.key(0))
  step = jax.jit(make_train_step(model, tx, learning_rate_schedule(tiny_config.optim, 10), 1))
  batch = next(pipeline.make_iterator(data.chunks('train', tiny_config.seq_len + 1), seq_len=tiny_config.seq_len,
                                      seed=0, shuffle=True, local_batch_size=tiny_config.batch_size))
  state, metrics = step(state, batch)  # a good step, so that the optimizer state is not all zeros
  assert bool(metrics['finite'])
  before = jax.device_get(state)
  targets = batch['targets'].copy()
  targets[0, 0] = data.tokenizer.vocab_size  # a token id outside the vocabulary: its loss is NaN
  bad = {**batch, 'targets': targets, 'loss_mask': np.ones_like(batch['loss_mask'])}
  state, metrics = step(state, bad)
  assert not bool(metrics['finite']) and not np.isfinite(float(metrics['loss']))
  assert int(state.step) == 2  # the batch is consumed
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
    if np.issubdtype(a.dtype, np.integer):  # the optimizer's step counts: the schedule follows state.step
      np.testing.assert_array_equal(np.asarray(b), 2)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  state, metrics = step(state, batch)
  assert bool(metrics['finite'])
  assert not np.array_equal(np.asarray(state.params['token_embedding']), before.params['token_embedding'])


def test_nonfinite_updates_are_skipped_and_counted(tiny_config, tmp_path, capsys):
  config = _nonfinite_config(tiny_config, 'skip')
  train(config, str(tmp_path))
  out = capsys.readouterr().out
  # Pulled from the device at each save (every 2 steps): one warning per pull.
  assert 'warning: skipped the non-finite update of steps 1, 2 (step 1: loss ' in out
  assert 'learning rate nan); 2 skipped in this run so far.' in out
  assert 'warning: skipped the non-finite update of steps 3, 4 (step 3: ' in out and '4 skipped in this run' in out
  records = _records(tmp_path)
  assert [r['step'] for r in records] == [1, 2, 3, 4] and all(r['skipped'] for r in records)
  data = builder.prepare(config.data, log=lambda m: None)
  model = build_model(config, data.tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  initial = state_lib.create_state(model, make_optimizer(config.optim, 4), config.seq_len, mesh,
                                   jax.random.key(config.seed))
  _, params = _final_params(tmp_path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing was applied


def test_nonfinite_update_stops_the_run_naming_the_step(tiny_config, tmp_path):
  with pytest.raises(JaxgptError, match=r"step 1: the update is not finite \(loss [0-9.]+, grad norm [0-9.]+, "
                                        r"learning rate nan\)\. Stopped without applying it"):
    train(_nonfinite_config(tiny_config, 'stop'), str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == []  # nothing saved
