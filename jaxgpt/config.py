"""Command-line configs: load an ml-collections file, apply overrides, validate.

Every entry point goes through `run_cli`, which turns the mistakes users make
(a missing config file, an override of a field that does not exist, a value
that cannot work) into one line on stderr and exit status 2, not a traceback.
"""

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags


class JaxgptError(Exception):
  """A problem the user can fix. The message names the problem and the fix."""


def define_config_flag():
  """Defines --config (file) with --config.a.b=value overrides."""
  return config_flags.DEFINE_config_file(
      'config', None, 'Path to an ml-collections config file, e.g. configs/quickstart.py.',
      lock_config=True)


def _config_path(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with config mistakes reported in one readable line."""
  path = _config_path(argv[1:])
  if path is not None and not os.path.isfile(path.split(':', 1)[0]):
    _fail(f'config file {path.split(":", 1)[0]!r} does not exist. '
          'Pass an existing file, e.g. --config configs/quickstart.py.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}. Run with --helpfull to see the flags.')
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    _fail(f'unknown config field in {" ".join(bad)} ({e}). '
          f'Check the spelling against the fields of {path}.')
  return []  # unreachable: _fail exits


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
  """Runs `main` under absl with readable errors for flags and JaxgptError."""

  def guarded_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
    try:
      main(argv)
    except JaxgptError as e:
      _fail(str(e))

  app.run(guarded_main, flags_parser=_parse_flags)


def require_config(config: ConfigDict | None) -> ConfigDict:
  if config is None:
    raise JaxgptError('no config given. Pass --config configs/quickstart.py (or another file in configs/).')
  return config


def validate(config: ConfigDict) -> None:
  """Checks the relations between fields that no single field type can express."""
  m, t, d, o = config.model, config.train, config.data, config.optim
  problems = []
  if m.embed_dim % m.num_heads:
    problems.append(f'model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}')
  if config.seq_len > m.max_len:
    problems.append(f'seq_len={config.seq_len} exceeds model.max_len={m.max_len}; raise model.max_len or lower seq_len')
  if config.batch_size % o.grad_accum_steps:
    problems.append(f'batch_size={config.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}')
  if d.source not in ('stdlib', 'dir', 'jsonl'):
    problems.append(f"data.source={d.source!r} is not one of 'stdlib', 'dir', 'jsonl'")
  if d.source in ('dir', 'jsonl') and not d.path:
    problems.append(f'data.source={d.source!r} needs data.path (a directory or a .jsonl file)')
  if d.on_bad_utf8 not in ('skip', 'error'):
    problems.append(f"data.on_bad_utf8={d.on_bad_utf8!r} is not 'skip' or 'error'")
  if not 0 < d.val_fraction < 1:
    problems.append(f'data.val_fraction={d.val_fraction} must be between 0 and 1')
  if m.remat not in ('none', 'full', 'dots'):
    problems.append(f"model.remat={m.remat!r} is not one of 'none', 'full', 'dots'")
  for name in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every', 'eval_batches'):
    if t[name] <= 0:
      problems.append(f'train.{name}={t[name]} must be positive')
  if problems:
    raise JaxgptError('invalid config: ' + '; '.join(problems) + '.')
