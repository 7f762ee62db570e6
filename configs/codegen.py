"""Recipe: code generation, by fine-tuning GPT-2 on Python source (docs/recipes.md#code-generation).

  python -m jaxgpt.train --config configs/codegen.py:small --workdir runs/code --config.init_from=~/models/gpt2
  python -m jaxgpt.evaluate --task code --workdir runs/code --data examples/code/problems.jsonl \
      --num_samples 10 --pass_k 1,5 --temperature 0.8

Trains on this Python's standard library (no download); for your own code use
--config.data.source=dir --config.data.path=~/src --config.data.glob='**/*.py'. GPT-2's byte-level
tokenizer keeps indentation exactly. The metric is pass@k on HumanEval-shaped problems, each
completion run against its tests in a separate process with a time and a memory limit.
(Not named code.py: that would shadow the standard library's `code` module.)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_gpt2  # noqa: E402  (a sibling config: GPT-2's shapes and fine-tuning settings)


def get_config(size: str = 'small'):
  c = finetune_gpt2.get_config(size)
  c.data.source = 'stdlib'
  c.sample.prompts = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',)
  return c
