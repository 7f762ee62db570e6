"""Bad inputs to every command: each exits non-zero with one readable line naming the problem.

The table is docs/troubleshooting.md's, case for case. The commands run as real
processes, a few at a time, forked from one that has imported JAX (tests/forked_cli.py):
importing is most of a command's time.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_OVERRIDES, override_args

QUICKSTART = ('--config', 'configs/quickstart.py')
TWO_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def _cases(root, data_cache, trained_run):
  """(id, module, args, env, the message expected on stderr)."""
  tiny = (*QUICKSTART, *override_args(TINY_OVERRIDES), f'--config.data.cache_dir={data_cache}')
  workdir = str(root / 'run')
  return [
      ('override of the wrong type', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.optim.lr=fast'),
       None, "--config.optim.lr=fast"),
      ('unknown field', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.model.depth=3'),
       None, 'unknown config field in --config.model.depth=3'),
      ('zero batch size', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.batch_size=0'),
       None, 'invalid config: batch_size=0 must be positive.'),
      ('negative layers', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.model.num_layers=-2'),
       None, 'invalid config: model.num_layers=-2 must be positive.'),
      ('seq_len beyond the context', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.seq_len=256'),
       None, 'seq_len=256 exceeds model.max_len=128'),
      ('batch not divisible by devices', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.batch_size=7'),
       TWO_DEVICES, 'not divisible by the data-parallel size 2'),
      ('mesh larger than the machine', 'jaxgpt.train', (*QUICKSTART, '--workdir', workdir, '--config.mesh.data=3'),
       None, 'mesh (data=3, fsdp=1, tensor=1) needs 3 devices but 1 are available'),
      ('unknown non-finite policy', 'jaxgpt.train',
       (*QUICKSTART, '--workdir', workdir, '--config.train.on_nonfinite=maybe'),
       None, "train.on_nonfinite='maybe' is not 'skip' or 'stop'"),
      ('missing config file', 'jaxgpt.train', ('--config', 'configs/nope.py', '--workdir', workdir),
       None, "config file 'configs/nope.py' does not exist"),
      ('config file with a syntax error', 'jaxgpt.train', ('--config', str(root / 'broken.py'), '--workdir', workdir),
       None, 'broken.py has a syntax error at line 1'),
      ('config file that raises', 'jaxgpt.train', ('--config', str(root / 'raises.py'), '--workdir', workdir),
       None, 'raises.py failed to load (ZeroDivisionError: division by zero). Fix the file.'),
      ('no workdir', 'jaxgpt.train', QUICKSTART, None, '--workdir is required'),
      ('empty JSONL', 'jaxgpt.train',
       (*tiny, '--workdir', workdir, '--config.data.source=jsonl', f'--config.data.path={root / "empty.jsonl"}'),
       None, 'no usable text in'),
      ('missing JSONL', 'jaxgpt.train',
       (*tiny, '--workdir', workdir, '--config.data.source=jsonl', f'--config.data.path={root / "nope.jsonl"}'),
       None, 'nope.jsonl does not exist'),
      ('binary file in a text directory', 'jaxgpt.train',
       (*tiny, '--workdir', workdir, '--config.data.source=dir', f'--config.data.path={root / "texts"}',
        '--config.data.on_bad_utf8=error'), None, 'binary.txt is not valid UTF-8'),
      ('workdir under a file', 'jaxgpt.train', (*tiny, '--workdir', str(root / 'a_file' / 'run')),
       None, 'cannot write to --workdir'),
      ('checkpoint too big for the disk', 'jaxgpt.train',
       (*tiny, '--workdir', str(root / 'huge'), '--config.model.num_layers=64', '--config.model.num_heads=64',
        '--config.model.embed_dim=65536', '--config.model.mlp_dim=262144'),
       None, 'but one checkpoint of this model (parameters and optimizer state) takes'),
      ('checkpoint of another architecture', 'jaxgpt.train',
       (*tiny, '--workdir', str(root / 'other_architecture'), '--config.model.num_layers=3'),
       None, 'has a different model shape (num_layers: checkpoint 2, config 3)'),
      ('prepare without a config', 'jaxgpt.prepare', (), None, 'no config given'),
      ('prepare with a zero vocabulary', 'jaxgpt.prepare', (*QUICKSTART, '--config.data.vocab_size=0'),
       None, 'data.vocab_size=0 must be positive'),
      ('sample from a directory that is not a run', 'jaxgpt.sample', ('--workdir', str(root)),
       None, 'is not a jaxgpt run directory'),
      ('sample with the tokenizer missing', 'jaxgpt.sample', ('--workdir', str(root / 'no_tokenizer')),
       None, 'cannot load the tokenizer at'),
      ('sample with a corrupt tokenizer', 'jaxgpt.sample', ('--workdir', str(root / 'bad_tokenizer')),
       None, 'cannot load the tokenizer at'),
      ('sample before any checkpoint', 'jaxgpt.sample', ('--workdir', str(root / 'no_checkpoint')),
       None, 'has no checkpoint yet'),
      ('sample zero tokens', 'jaxgpt.sample', ('--workdir', trained_run, '--max_new_tokens', '0'),
       None, 'max_new_tokens=0 must be between 1 and 63'),
      ('sample with top_p above 1', 'jaxgpt.sample', ('--workdir', trained_run, '--top_p', '2'),
       None, 'top_p=2.0 must be in (0, 1]'),
      ('sample with a negative seed', 'jaxgpt.sample', ('--workdir', trained_run, '--seed', '-1'),
       None, 'seed=-1 must be an integer from 0 to 4294967295'),
      ('evaluate without a workdir', 'jaxgpt.evaluate', (), None, '--workdir is required'),
      ('evaluate with a zero batch', 'jaxgpt.evaluate', ('--workdir', trained_run, '--batch_size', '0'),
       None, '--max_docs and --batch_size must be positive'),
      ('evaluate with a negative seed', 'jaxgpt.evaluate', ('--workdir', trained_run, '--seed', '-1'),
       None, 'seed=-1 must be an integer from 0 to 4294967295'),
      ('convert a Hugging Face directory without weights', 'jaxgpt.convert',
       ('--workdir', str(root / 'converted'), '--import_hf', str(root / 'hf')),
       None, 'is not a Hugging Face model directory'),
      ('convert without a direction', 'jaxgpt.convert', ('--workdir', trained_run),
       None, 'give --workdir and exactly one of --import_hf'),
  ]


def _make_inputs(root, trained_run) -> None:
  (root / 'broken.py').write_text('def get_config(:\n')
  (root / 'raises.py').write_text('def get_config():\n  return 1 / 0\n')
  (root / 'empty.jsonl').write_text('')
  (root / 'texts').mkdir()
  (root / 'texts' / 'notes.txt').write_text('plain text\n')
  (root / 'texts' / 'binary.txt').write_bytes(bytes(range(256)) * 8)
  (root / 'a_file').write_text('not a directory')
  (root / 'hf').mkdir()
  (root / 'hf' / 'config.json').write_text('{}')
  shutil.copytree(trained_run, root / 'other_architecture')
  for name in ('no_tokenizer', 'bad_tokenizer', 'no_checkpoint'):
    shutil.copytree(trained_run, root / name, ignore=shutil.ignore_patterns('checkpoints'))
  os.remove(root / 'no_tokenizer' / 'tokenizer.model')
  (root / 'bad_tokenizer' / 'tokenizer.model').write_bytes(b'not a sentencepiece model')
  shutil.copytree(os.path.join(trained_run, 'checkpoints'), root / 'no_tokenizer' / 'checkpoints')


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory, data_cache, trained_run):
  root = tmp_path_factory.mktemp('bad_inputs')
  _make_inputs(root, trained_run)
  # The cases run three at a time and a training run locks its workdir: each gets its own.
  shared = str(root / 'run')
  cases = [(name, module, tuple(str(root / 'runs' / name.replace(' ', '_')) if a == shared else a for a in args),
            env, message) for name, module, args, env, message in _cases(root, data_cache, trained_run)]
  return {case[0]: (case, result) for case, result in zip(cases, run_forked(root, cases))}


def run_forked(root, cases) -> list[subprocess.CompletedProcess]:
  """Each case's command as a real process, forked from one that imported JAX once (tests/forked_cli.py)."""
  cases_path, results_path = root / 'cases.json', root / 'results.json'
  cases_path.write_text(json.dumps([{'module': module, 'args': list(args), 'env': env}
                                    for _, module, args, env, _ in cases]))
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'forked_cli.py'), str(cases_path),
                        str(results_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  return [subprocess.CompletedProcess(case[1], r['returncode'], r['stdout'], r['stderr'])
          for case, r in zip(cases, json.loads(results_path.read_text()))]


def _documented_commands() -> set[str]:
  """The commands named in the first column of docs/troubleshooting.md's table of bad inputs."""
  with open(os.path.join(REPO, 'docs', 'troubleshooting.md')) as f:
    lines = f.read().split('| command | what went wrong |', 1)[1].split('\n\n', 1)[0].splitlines()[2:]
  return {f'jaxgpt.{name.strip()}' for line in lines for name in line.split('|')[1].split(',')}


def test_the_table_has_every_command(outcomes):
  # Every command the documented table names has its bad inputs run here, but serve: a server's bad requests
  # are tests/test_serve.py's, its bad flags tests/test_cli.py's.
  documented = _documented_commands()
  assert 'jaxgpt.train' in documented and 'jaxgpt.serve' in documented  # the table was found and parsed
  assert {case[1] for case, _ in outcomes.values()} == documented - {'jaxgpt.serve'}


def test_each_bad_input_is_one_clear_error(outcomes):
  failures = []
  for name, ((_, module, _, _, message), result) in outcomes.items():
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    if result.returncode == 0 or 'Traceback' in result.stderr or len(errors) != 1 or message not in errors[0]:
      failures.append(f'{name} ({module}): exit {result.returncode}\n{result.stderr[-800:]}')
  assert not failures, f'{len(failures)} failed:\n\n' + '\n\n'.join(failures)


def test_a_refused_resume_leaves_the_run_untouched(outcomes):
  (_, _, args, _, _), _ = outcomes['checkpoint of another architecture']
  workdir = args[args.index('--workdir') + 1]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['num_layers'] == 2  # sample, evaluate and serve still load it
