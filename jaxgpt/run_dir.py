"""A run directory's own files: the config and tokenizer that make a folder a jaxgpt run.

Training writes them once resuming is known to work; sample, evaluate, serve
and convert read them to rebuild the model before loading its parameters.
"""

import json
import os

from ml_collections import ConfigDict

from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'


def write_run_files(workdir: str, config, tokenizer: Tokenizer) -> None:
  """The config and tokenizer that make `workdir` a run directory (`load_run` reads them)."""
  tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json(indent=2))


def saved_tokenizer(workdir: str) -> Tokenizer | None:
  """The tokenizer a run in `workdir` was trained with; None for a new workdir."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  return Tokenizer.load(path) if os.path.isfile(path) else None


def load_run(workdir: str) -> tuple[ConfigDict, Tokenizer]:
  """The config and tokenizer that jaxgpt.train saved in `workdir`."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise JaxgptError(f'{workdir} is not a jaxgpt run directory (no {CONFIG_FILE}). '
                      'Pass the --workdir you gave jaxgpt.train.')
  with open(config_path) as f:
    config = ConfigDict(json.load(f))
  return config, Tokenizer.load(os.path.join(workdir, TOKENIZER_FILE))
