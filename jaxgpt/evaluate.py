"""Evaluation of a trained run: `python -m jaxgpt.evaluate --workdir DIR [--text PATH] [--references FILE.jsonl]`.

- Perplexity and bits per byte on the run's held-out split, or on any
  directory of text files or JSONL file. Bits per byte divide the total
  log-loss by the text's UTF-8 bytes, so models with different tokenizers
  can be compared.
- BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) of greedy continuations
  against references, from a JSONL file of {"prompt": ..., "reference": ...}.
- A samples file (JSONL and Markdown) for people to judge fluency and coherence.

Results go to `DIR/eval/step_N/results.json` and to TensorBoard (`eval/...`).
"""

import json
import math
import os
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import flags

from jaxgpt import state
from jaxgpt.config import JaxgptError, require_extra, run_cli
from jaxgpt.data import builder, sources
from jaxgpt.metrics import MetricWriter
from jaxgpt.model import GPT, loss_sums
from jaxgpt.sample import Sampling, complete

RESULTS_FILE, SAMPLES_JSONL, SAMPLES_MARKDOWN = 'results.json', 'samples.jsonl', 'samples.md'


# --- perplexity and bits per byte ------------------------------------------

def language_model_metrics(model: GPT, params, documents: Iterable[Sequence[int]], num_bytes: int,
                           seq_len: int, batch_size: int = 8) -> dict:
  """Loss, perplexity and bits per byte of documents given as token ids (framed BOS ... EOS).

  Each document is cut into windows of seq_len + 1 tokens overlapping by one,
  so every token after the first is predicted exactly once.
  """
  windows = []
  for doc in documents:
    for start in range(0, max(len(doc) - 1, 0), seq_len):
      windows.append(doc[start:start + seq_len + 1])
  if not windows:
    raise JaxgptError('no text to evaluate: every document is empty.')
  loss_sum, count = 0.0, 0
  for first in range(0, len(windows), batch_size):
    rows = windows[first:first + batch_size]
    tokens_BxT = np.zeros((batch_size, seq_len + 1), np.int32)
    mask_BxT = np.zeros((batch_size, seq_len), np.int32)
    for r, window in enumerate(rows):
      tokens_BxT[r, :len(window)] = window
      mask_BxT[r, :len(window) - 1] = 1
    batch = {'inputs': tokens_BxT[:, :-1], 'targets': tokens_BxT[:, 1:], 'loss_mask': mask_BxT,
             'segment_ids': np.ones_like(mask_BxT), 'positions': np.tile(np.arange(seq_len), (batch_size, 1))}
    s, n = _loss_sums(model, params, batch)
    loss_sum, count = loss_sum + float(s), count + int(n)
  loss = loss_sum / count
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'bits_per_byte': loss_sum / (math.log(2) * max(num_bytes, 1)), 'tokens': count, 'bytes': num_bytes}


_loss_sums = jax.jit(loss_sums, static_argnums=(0,))


def held_out_documents(config, tokenizer, max_docs: int) -> tuple[list[list[int]], int]:
  """The run's validation split, as it was tokenized for training, and its size in bytes."""
  data = builder.prepare(config.data, log=lambda message: None)
  if data.tokenizer.fingerprint != tokenizer.fingerprint:
    raise JaxgptError('the data settings saved with this run now build another tokenizer; '
                      'evaluate on a --text path instead.')
  split = data.source('validation')
  docs = [list(split[i]['tokens']) for i in range(min(len(split), max_docs))]
  return docs, sum(len(tokenizer.decode(d).encode('utf-8')) for d in docs)


def text_documents(path: str, config, tokenizer, glob: str, text_field: str,
                   max_docs: int) -> tuple[list[list[int]], int]:
  """Every usable document of a directory (files matching `glob`) or a JSONL file, tokenized."""
  path = os.path.expanduser(path)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.source, data_cfg.path = ('jsonl', path) if path.endswith('.jsonl') else ('dir', path)
  data_cfg.glob, data_cfg.text_field = glob, text_field
  if not os.path.exists(path):
    raise JaxgptError(f'--text {path} does not exist. Give a directory of text files or a .jsonl file.')
  texts = []
  for record in sources.open_source(data_cfg).records():
    text = sources.extract_text(record, data_cfg).text
    if text and text.strip():
      texts.append(text)
      if len(texts) == max_docs:
        break
  if not texts:
    raise JaxgptError(f'no usable text in {path} (glob {glob!r}, JSONL field {text_field!r}).')
  docs = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
  return docs, sum(len(t.encode('utf-8')) for t in texts)


# --- BLEU and ROUGE ---------------------------------------------------------

def read_references(path: str) -> list[dict]:
  """[{'prompt', 'reference'}] from a JSONL file; each bad line is named."""
  try:
    with open(os.path.expanduser(path), encoding='utf-8') as f:
      lines = f.readlines()
  except OSError as e:
    raise JaxgptError(f'cannot read the references file {path} ({e.strerror}).') from None
  examples = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      example = json.loads(line)
    except json.JSONDecodeError:
      raise JaxgptError(f'{path}:{number} is not JSON.') from None
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


def write_samples(directory: str, samples: list[dict], title: str) -> None:
  """The samples as JSONL (for tools) and Markdown (for people)."""
  with open(os.path.join(directory, SAMPLES_JSONL), 'w') as f:
    for sample in samples:
      f.write(json.dumps(sample) + '\n')
  with open(os.path.join(directory, SAMPLES_MARKDOWN), 'w') as f:
    f.write(f'# {title}\n')
    for i, sample in enumerate(samples, 1):
      f.write(f'\n## Sample {i}\n\n**Prompt**\n\n```\n{sample["prompt"]}\n```\n\n'
              f'**Output**\n\n```\n{sample["output"]}\n```\n')
      if 'reference' in sample:
        f.write(f'\n**Reference**\n\n```\n{sample["reference"]}\n```\n')


def evaluate(workdir: str, *, step: int | None = None, text: str = '', glob: str = '**/*.txt',
             text_field: str = 'text', max_docs: int = 100, batch_size: int = 8, references: str = '',
             sampling: Sampling = Sampling(), prompts: Sequence[str] = ()) -> dict:
  """Runs every evaluation asked for and writes results, samples and TensorBoard scalars."""
  config, tokenizer = state.load_run(workdir)
  examples = read_references(references) if references else []  # a bad file fails before loading the model
  model, params, step = state.load_params(config, tokenizer, workdir, step)
  if text:
    docs, num_bytes = text_documents(text, config, tokenizer, glob, text_field, max_docs)
  else:
    docs, num_bytes = held_out_documents(config, tokenizer, max_docs)
  results = {'step': step, 'text': text or 'held-out split',
             **language_model_metrics(model, params, docs, num_bytes, config.seq_len, batch_size)}
  if examples:
    metrics, samples = generation_metrics(model, params, tokenizer, examples, sampling)
    results.update(metrics)
  else:
    prompts = list(prompts or config.sample.prompts)
    samples = [{'prompt': p, 'output': c.text} for p, c in zip(prompts, complete(model, params, tokenizer, prompts,
                                                                                   sampling))]
  directory = os.path.join(workdir, 'eval', f'step_{step}')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, RESULTS_FILE), 'w') as f:
    json.dump(results, f, indent=2)
  write_samples(directory, samples, f'Samples from {workdir} at step {step}')
  writer = MetricWriter(workdir)
  writer.scalars(step, {f'eval/{k}': v for k, v in results.items() if isinstance(v, float)})
  writer.close()
  return {**results, 'directory': directory}


# --- command line ---------------------------------------------------------

def _define_flags() -> None:
  # Defined only when this module runs as a command, so importing it adds no flags.
  flags.DEFINE_string('workdir', None, 'The run directory written by jaxgpt.train.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
  flags.DEFINE_string('text', '', "A directory of text files or a .jsonl file; '' = the run's held-out split.")
  flags.DEFINE_string('glob', '**/*.txt', 'Files taken from a --text directory.')
  flags.DEFINE_string('text_field', 'text', 'The field holding each document in a --text JSONL file.')
  flags.DEFINE_integer('max_docs', 100, 'Documents evaluated at most.')
  flags.DEFINE_integer('batch_size', 8, 'Windows per forward pass.')
  flags.DEFINE_string('references', '', 'JSONL of {"prompt", "reference"} for BLEU and ROUGE.')
  flags.DEFINE_multi_string('prompt', [], "Prompts for the samples file without --references (default: the run's).")
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens generated per prompt.')
  flags.DEFINE_float('temperature', 0.0, 'Softmax temperature for the samples; 0 is greedy.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1 for all tokens.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  if FLAGS.max_docs < 1 or FLAGS.batch_size < 1:
    raise JaxgptError('--max_docs and --batch_size must be positive.')
  sampling = Sampling(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                      seed=FLAGS.seed)
  results = evaluate(FLAGS.workdir, step=FLAGS.step, text=FLAGS.text, glob=FLAGS.glob, text_field=FLAGS.text_field,
                     max_docs=FLAGS.max_docs, batch_size=FLAGS.batch_size, references=FLAGS.references,
                     sampling=sampling, prompts=FLAGS.prompt)
  print(f'# step {results["step"]} of {FLAGS.workdir}, on the {results["text"]}')
  print(f'loss {results["loss"]:.4f} | perplexity {results["perplexity"]:.2f} | '
        f'bits per byte {results["bits_per_byte"]:.4f} | {results["tokens"]:,} tokens, {results["bytes"]:,} bytes')
  if 'bleu' in results:
    print(f'BLEU {results["bleu"]:.2f} | ROUGE-1 {results["rouge1"]:.4f} | ROUGE-2 {results["rouge2"]:.4f} | '
          f'ROUGE-L {results["rougeL"]:.4f}')
  print(f'results, samples.jsonl and samples.md in {results["directory"]}')


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
