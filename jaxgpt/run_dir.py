"""A run directory's own files: the config and tokenizer that make a folder a jaxgpt run.

Training writes them once resuming is known to work; sample, evaluate, serve
and convert read them to rebuild the model before loading its parameters.
"""

import json

from ml_collections import ConfigDict

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'


def write_run_files(workdir: str, config, tokenizer: Tokenizer) -> None:
  """The config and tokenizer that make `workdir` a run directory (`load_run` reads them)."""
  directory = paths.path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save(directory / TOKENIZER_FILE)
  (directory / CONFIG_FILE).write_text(config.to_json(indent=2))


def saved_tokenizer(workdir: str) -> Tokenizer | None:
  """The tokenizer a run in `workdir` was trained with; None for a new workdir."""
  path = paths.path(workdir) / TOKENIZER_FILE
  return Tokenizer.load(path) if path.exists() else None


def load_run(workdir: str) -> tuple[ConfigDict, Tokenizer]:
  """The config and tokenizer that jaxgpt.train saved in `workdir`."""
  directory = paths.path(workdir)
  if not (directory / CONFIG_FILE).exists():
    raise JaxgptError(f'{workdir} is not a jaxgpt run directory (no {CONFIG_FILE}). '
                      'Pass the --workdir you gave jaxgpt.train.')
  config = ConfigDict(json.loads((directory / CONFIG_FILE).read_text()))
  return config, Tokenizer.load(directory / TOKENIZER_FILE)
