"""The real command lines, end to end, in subprocesses."""

import json
import os

import pytest

from conftest import TINY_OVERRIDES, override_args, run_module


def _train(workdir, data_cache, *extra, env=None):
  return run_module('jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
                    *override_args(TINY_OVERRIDES), f'--config.data.cache_dir={data_cache}', *extra, env=env)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 10-step run, then the same command resumed to 20 steps."""
  root = tmp_path_factory.mktemp('cli')
  workdir, cache = root / 'run', root / 'cache'
  xla_cache = f'--config.train.compilation_cache_dir={root / "xla"}'
  first = _train(workdir, cache, '--config.train.num_steps=10', xla_cache)
  assert first.returncode == 0, first.stderr[-3000:]
  second = _train(workdir, cache, xla_cache)
  assert second.returncode == 0, second.stderr[-3000:]
  return workdir, cache, first, second


def test_train_runs_end_to_end_and_reports_validation(trained):
  workdir, _, first, _ = trained
  out = first.stdout
  assert 'data: trained a 512-piece BPE tokenizer' in out
  assert 'step 10/10 | loss' in out and 'tok/s | MFU' in out
  assert 'step 10: validation loss' in out and 'perplexity' in out
  assert '--- sample, prompt' in out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
  assert os.listdir(workdir / 'tensorboard')
  results = json.loads((workdir / 'results.json').read_text())
  assert results['step'] == 20 and 2.0 < results['loss'] < 7.0  # below log(512)=6.24 at random
  assert 0.5 < results['bits_per_byte'] < 5.0 and 'bits/byte' in out


def test_compiled_train_step_is_cached_for_the_restart(trained):
  workdir = trained[0]
  assert any(name.startswith('jit_train_step') for name in os.listdir(workdir.parent / 'xla'))


def test_second_run_resumes_from_the_checkpoint(trained):
  _, _, _, second = trained
  out = second.stdout
  assert 'data: reusing' in out
  assert 'resumed from step 10' in out
  assert 'step 11: compiled' in out and 'step 20/20 | loss' in out
  assert 'step 5/' not in out


def test_sample_command_continues_a_prompt(trained):
  workdir, _, _, _ = trained
  result = run_module('jaxgpt.sample', '--workdir', str(workdir), '--prompt', 'def main(',
                      '--prompt', 'import', '--max_new_tokens', '12', '--temperature', '0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert '# step 20 of' in result.stdout
  first, second = result.stdout.split("--- prompt: 'def main('\n", 1)[1].split("--- prompt: 'import'\n")
  assert first.startswith('def main(') and len(first.rstrip('\n')) >= len('def main(')
  assert len(first) > len('def main(\n') and second.startswith('import')


def test_resuming_with_another_model_shape_is_refused(trained):
  workdir, cache, _, _ = trained
  result = _train(workdir, cache, '--config.model.num_layers=3', '--config.train.num_steps=30')
  assert result.returncode == 2
  assert 'different model shape (num_layers: checkpoint 2, config 3)' in result.stderr
  assert 'Traceback' not in result.stderr


def test_resuming_with_another_tokenizer_is_refused(trained):
  workdir, cache, _, _ = trained
  result = _train(workdir, cache, '--config.data.vocab_size=600', '--config.train.num_steps=30')
  assert result.returncode == 2
  assert 'different tokenizer' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('args,message', [
    (['--config', 'configs/nope.py', '--workdir', '/tmp/x'], "config file 'configs/nope.py' does not exist"),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.model.depth=3'],
     'unknown config field in --config.model.depth=3'),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.model.num_layers=many'],
     '--config.model.num_layers=many'),
    (['--config', 'configs/quickstart.py'], '--workdir is required'),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.model.num_heads=3'],
     'model.embed_dim=128 is not divisible by model.num_heads=3'),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.sample.max_new_tokens=500'],
     'sample.max_new_tokens=500 must be between 1 and 127'),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.mesh.data=3'],
     'mesh (data=3, fsdp=1, tensor=1) needs 3 devices but 1 are available'),
    (['--config', 'configs/quickstart.py', '--workdir', '/tmp/x', '--config.data.source=dir',
      '--config.data.path=/nonexistent/texts'], "data.path='/nonexistent/texts' is not a directory"),
])
def test_bad_input_is_one_clear_error(args, message):
  result = run_module('jaxgpt.train', *args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_empty_data_directory_is_one_clear_error(tmp_path):
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / 'a.txt').write_text('   \n')
  (tmp_path / 'texts' / 'b.txt').write_bytes(b'\xff\xfe\x00bad')
  result = run_module('jaxgpt.train', '--config', 'configs/quickstart.py', '--workdir', str(tmp_path / 'run'),
                      '--config.data.source=dir', f'--config.data.path={tmp_path / "texts"}',
                      f'--config.data.cache_dir={tmp_path / "cache"}')
  assert result.returncode == 2
  assert 'no usable text' in result.stderr and 'not valid UTF-8' in result.stderr
  assert 'Traceback' not in result.stderr


def test_sample_on_a_directory_that_is_not_a_run(tmp_path):
  result = run_module('jaxgpt.sample', '--workdir', str(tmp_path))
  assert result.returncode == 2 and 'is not a jaxgpt run directory' in result.stderr


def test_verbose_adds_the_traceback_to_the_message(tmp_path):
  result = run_module('jaxgpt.sample', '--workdir', str(tmp_path), '--verbose')
  assert result.returncode == 2 and 'Traceback' in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('error: ') and 'is not a jaxgpt run directory' in result.stderr


def test_serve_on_a_port_in_use_is_one_clear_error(tmp_path):
  import socket
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = run_module('jaxgpt.serve', '--workdir', str(tmp_path), '--port', str(port))
  assert result.returncode == 2 and f'cannot listen on 127.0.0.1:{port}' in result.stderr
  assert 'Traceback' not in result.stderr


def test_a_missing_optional_dependency_names_its_extra():
  from jaxgpt.config import JaxgptError, require_extra
  with pytest.raises(JaxgptError, match=r'no_such_module_xyz not installed: .*pip install -e "\.\[serve\]"'):
    require_extra('serve', 'no_such_module_xyz')
  require_extra('serve', 'json')  # present: no error


@pytest.mark.parametrize('command,flag', [('jaxgpt.train', '--workdir'), ('jaxgpt.sample', '--prompt'),
                                          ('jaxgpt.convert', '--import_hf')])
def test_help_prints_the_usage_and_succeeds(command, flag):
  result = run_module(command, '--help')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'python -m {command}' in result.stdout and flag in result.stdout
