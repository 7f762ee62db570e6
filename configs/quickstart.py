"""Quickstart: a small GPT trained on the Python standard library's own source.

Runs on a 2-core CPU in a few minutes with no download:
  python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart
Point it at your own text with --config.data.source=dir --config.data.path=DIR
(or source=jsonl, path=FILE.jsonl, text_field=text). Every field and its
meaning: jaxgpt/config.py:base_config.
"""

from jaxgpt.config import base_config


def get_config():
  return base_config()  # the defaults are the quickstart
