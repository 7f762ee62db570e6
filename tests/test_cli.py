"""The real command lines, end to end, in subprocesses."""

import pytest

from conftest import run_module

# The train -> resume -> sample flow runs as README.md shows it, in tests/test_docs.py (its checks
# moved there and to tests/test_end_to_end.py); a resume with another model shape is refused in
# tests/test_bad_inputs.py.


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
