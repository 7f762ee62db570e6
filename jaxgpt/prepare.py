"""Data preparation alone: `python -m jaxgpt.prepare --config configs/X.py [--config.data.a=value]`.

Builds (or finds) exactly the cache directory that training reads: cleaned
text, the tokenizer, the tokenized TFDS dataset and report.json, and prints
the report. Training with the same data settings then starts at once.
"""

from absl import flags

from jaxgpt.config import define_config_flag, require_config, run_cli, validate
from jaxgpt.data import builder
from jaxgpt.data.report import table


def main(argv):
  del argv
  config = require_config(flags.FLAGS.config)
  validate(config)
  data = builder.prepare(config.data)
  if data.reused:
    print(table(data.report))
  print(f'dataset: {data.directory}')


def cli():
  define_config_flag()
  run_cli(main)


if __name__ == '__main__':
  cli()
