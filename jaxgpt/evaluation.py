"""What a model is measured by, used by training's validations and by the `jaxgpt.evaluate` command.

- Loss, perplexity and bits per byte: `eval_sums` adds up, per batch, the
  token losses, the tokens predicted and the UTF-8 bytes of the text those
  tokens stand for (the tokenizer's `token_bytes` table; BOS, EOS and other
  special tokens are 0 bytes); `summarize` turns the totals into the figures.
  Bits per byte is total loss in bits over those bytes, so it compares models
  whose tokenizers differ. For instruction data the loss mask keeps response
  tokens only, and so do both sums: the figures are those of the responses.
- `held_out_metrics`: the run's held-out split through the training pipeline
  (packed rows), a fixed random sample of batches or the whole split.
- `language_model_metrics`: any documents given as token ids, each cut into
  windows of the model's context.
- BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) of continuations against
  references, and samples files (JSONL and Markdown) for people to judge.
"""

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import paths, sharding
from jaxgpt.config import JaxgptError, require_extra
from jaxgpt.data import pipeline
from jaxgpt.model import GPT, loss_sums
from jaxgpt.sample import Sampling, complete

SAMPLES_JSONL, SAMPLES_MARKDOWN = 'samples.jsonl', 'samples.md'


# --- loss, perplexity and bits per byte -------------------------------------

def eval_sums(model: GPT, params, batch: dict, token_bytes):
  """(loss sum, tokens predicted, bytes of the text they stand for) over the loss mask of `batch`."""
  loss_sum, count = loss_sums(model, params, batch)
  num_bytes = (jnp.asarray(token_bytes)[batch['targets']] * batch['loss_mask']).sum()
  return loss_sum, count, num_bytes


def summarize(loss_sum: float, tokens: float, num_bytes: float) -> dict:
  """The figures from the totals: the one place bits per byte is computed."""
  loss = float(loss_sum) / max(float(tokens), 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'bits_per_byte': float(loss_sum) / (math.log(2) * max(float(num_bytes), 1.0)),
          'tokens': int(tokens), 'bytes': int(num_bytes)}


def loss_scope(data_cfg) -> str:
  """What the loss (and so every figure) covers: instruction data trains on the responses alone."""
  return 'all tokens' if data_cfg.format == 'text' else 'response tokens only'


def held_out_metrics(eval_step, params, data, config, mesh, whole_split: bool = False) -> dict:
  """Loss, perplexity and bits per byte on the held-out split, read through the training pipeline.

  `eval_step(params, batch)` returns `eval_sums`. Periodic validations read
  `train.eval_batches` batches drawn at random from the whole split (the same
  ones every time, so they compare across steps); `whole_split` reads every
  full batch of it once, for the figures a run reports. Every process reads
  the whole batches and keeps its own rows, so the figures are the same
  whatever the number of processes.
  """
  split = data.report['validation']
  tokens_per_batch = config.batch_size * (config.seq_len + 1)
  num_batches = max(1, split['tokens'] // tokens_per_batch) if whole_split else config.train.eval_batches
  batches = pipeline.make_iterator(data.chunks('validation', config.seq_len + 1), seq_len=config.seq_len,
                                   shuffle=not whole_split, seed=0, local_batch_size=config.batch_size,
                                   process_index=0, process_count=1)
  rows = config.batch_size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  totals = np.zeros(3)
  for _ in range(num_batches):
    local = {k: v[mine] for k, v in next(batches).items()}
    totals += np.array(jax.device_get(eval_step(params, sharding.global_batch(local, mesh))), np.float64)
  return summarize(*totals)


def language_model_metrics(model: GPT, params, documents: Iterable[Sequence[int]], token_bytes,
                           seq_len: int, batch_size: int = 8, mesh=None) -> dict:
  """Loss, perplexity and bits per byte of documents given as token ids (framed BOS ... EOS).

  Each document is cut into windows of seq_len + 1 tokens overlapping by one,
  so every token after the first is predicted exactly once. With a `mesh`,
  every process gives the same documents and each batch is split over the
  mesh's batch axes (rounded up to a multiple of them with masked rows).
  """
  windows = []
  for doc in documents:
    for start in range(0, max(len(doc) - 1, 0), seq_len):
      windows.append(doc[start:start + seq_len + 1])
  if not windows:
    raise JaxgptError('no text to evaluate: every document is empty.')
  step = jax.jit(lambda params, batch: eval_sums(model, params, batch, token_bytes))
  if mesh is not None:
    batch_size = -(-batch_size // sharding.data_parallel_size(mesh.shape)) * sharding.data_parallel_size(mesh.shape)
  totals = np.zeros(3)
  for first in range(0, len(windows), batch_size):
    tokens_BxT = np.zeros((batch_size, seq_len + 1), np.int32)
    mask_BxT = np.zeros((batch_size, seq_len), np.int32)
    for r, window in enumerate(windows[first:first + batch_size]):
      tokens_BxT[r, :len(window)] = window
      mask_BxT[r, :len(window) - 1] = 1
    batch = {'inputs': tokens_BxT[:, :-1], 'targets': tokens_BxT[:, 1:], 'loss_mask': mask_BxT,
             'segment_ids': np.ones_like(mask_BxT), 'positions': np.tile(np.arange(seq_len), (batch_size, 1))}
    if mesh is not None:
      batch = sharding.put_global(batch, {k: sharding.batch_sharding(mesh) for k in batch})
    totals += np.array(sharding.to_host(step(params, batch)), np.float64)
  return summarize(*totals)


# --- BLEU and ROUGE ---------------------------------------------------------

def json_lines(path: str, what: str, not_json_hint: str = '') -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line of the JSONL file that is `what` (e.g. 'the
  references file'); an unreadable file or a line that is not JSON is one error naming it."""
  try:
    lines = paths.path(path).read_text().split('\n')
  except OSError as e:
    raise JaxgptError(f'cannot read {what} {path} ({e.strerror or e}).') from None
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError:
        raise JaxgptError(f'{path}:{number} is not JSON{not_json_hint}.') from None


def read_references(path: str) -> list[dict]:
  """[{'prompt', 'reference'}] from a JSONL file; each bad line is named."""
  examples = []
  for number, example in json_lines(path, 'the references file'):
    if not (isinstance(example, dict) and isinstance(example.get('prompt'), str)
            and isinstance(example.get('reference'), str)):
      raise JaxgptError(f'{path}:{number} needs string fields "prompt" and "reference".')
    examples.append({'prompt': example['prompt'], 'reference': example['reference']})
  if not examples:
    raise JaxgptError(f'{path} has no examples.')
  require_extra('eval', 'sacrebleu', 'rouge_score')  # checked here, before a run that will need them
  return examples


def generation_metrics(model: GPT, params, tokenizer, examples: list[dict], sampling: Sampling) -> tuple[dict, list]:
  """BLEU and ROUGE F1 of the continuations against the references, and the samples themselves."""
  import sacrebleu  # imported here: only runs that ask for generation metrics need these libraries
  from rouge_score import rouge_scorer

  outputs = [c.text for c in complete(model, params, tokenizer, [e['prompt'] for e in examples], sampling)]
  references = [e['reference'] for e in examples]
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])
  rouge = [scorer.score(ref, out) for ref, out in zip(references, outputs)]
  metrics = {'bleu': sacrebleu.corpus_bleu(outputs, [references]).score}
  for name in ('rouge1', 'rouge2', 'rougeL'):
    metrics[name] = float(np.mean([r[name].fmeasure for r in rouge]))
  samples = [{**e, 'output': out} for e, out in zip(examples, outputs)]
  return metrics, samples


def write_samples(directory, samples: list[dict], title: str) -> None:
  """The samples as JSONL (for tools) and Markdown (for people)."""
  directory = paths.path(directory)
  (directory / SAMPLES_JSONL).write_text(''.join(json.dumps(sample) + '\n' for sample in samples))
  markdown = [f'# {title}\n']
  for i, sample in enumerate(samples, 1):
    markdown.append(f'\n## Sample {i}\n\n**Prompt**\n\n```\n{sample["prompt"]}\n```\n\n'
                    f'**Output**\n\n```\n{sample["output"]}\n```\n')
    if 'reference' in sample:
      markdown.append(f'\n**Reference**\n\n```\n{sample["reference"]}\n```\n')
  (directory / SAMPLES_MARKDOWN).write_text(''.join(markdown))
