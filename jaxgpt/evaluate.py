"""Evaluation of a trained run: `python -m jaxgpt.evaluate --workdir DIR [--text PATH] [--references FILE.jsonl]`.

- Loss, perplexity and bits per byte on the run's held-out split, prepared
  exactly as training prepared it (a fine-tuned run's with its base model's
  tokenizer) and read as the run's last validation read it, so the figures
  agree with the run's own; or on any directory of text files or JSONL file.
- BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) of greedy continuations
  against references, from a JSONL file of {"prompt": ..., "reference": ...}.
- A samples file (JSONL and Markdown) for people to judge fluency and coherence.

The computations live in jaxgpt/evaluation.py, shared with training's
validations. Results go to `DIR/eval/step_N/results.json` and to TensorBoard
(`eval/...`).
"""

import json
import os
import sys
from collections.abc import Sequence

import jax
from absl import flags

from jaxgpt import inference, run_dir, sharding
from jaxgpt.config import JaxgptError, run_cli
from jaxgpt.data import builder, sources
from jaxgpt.evaluation import (eval_sums, generation_metrics, held_out_metrics, language_model_metrics,
                               loss_scope, read_references, write_samples)
from jaxgpt.metrics import MetricWriter
from jaxgpt.sample import DEFAULT_MAX_NEW_TOKENS, Sampling, complete, encode_prompt, fitting_max_new_tokens

RESULTS_FILE = 'results.json'


def run_data(config, tokenizer) -> builder.PreparedData:
  """The run's dataset as training prepared it (built again if the cache is gone)."""
  # Training tokenized a fine-tuned run's data with the base model's tokenizer, saved as the run's own.
  data = builder.prepare(config.data, log=lambda message: None, tokenizer=tokenizer if config.init_from else None)
  if data.tokenizer.fingerprint != tokenizer.fingerprint:
    raise JaxgptError('the data settings saved with this run now build another tokenizer (the data changed); '
                      'evaluate on a --text path instead.')
  return data


def held_out_split(model, params, config, tokenizer, whole_split: bool) -> dict:
  data = run_data(config, tokenizer)
  token_bytes = tokenizer.token_bytes()
  eval_step = jax.jit(lambda params, batch: eval_sums(model, params, batch, token_bytes))
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  return held_out_metrics(eval_step, params, data, config, mesh, whole_split)


def text_documents(path: str, config, tokenizer, glob: str, text_field: str, max_docs: int) -> list[list[int]]:
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
  return [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


def evaluate(workdir: str, *, step: int | None = None, text: str = '', glob: str = '**/*.txt',
             text_field: str = 'text', max_docs: int = 100, batch_size: int = 8, whole_split: bool = True,
             references: str = '', prompts: Sequence[str] = (), max_new_tokens: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
  """Runs every evaluation asked for and writes results, samples and TensorBoard scalars.

  The continuations (of the references' prompts, else of `prompts` or the run's
  sample prompts) are `max_new_tokens` long, or as long as fits the run's context.
  """
  config, tokenizer = run_dir.load_run(workdir)
  examples = read_references(references) if references else []  # a bad file fails before loading the model
  prompts = [e['prompt'] for e in examples] or list(prompts or config.sample.prompts)
  longest_prompt = max((len(encode_prompt(tokenizer, p)) for p in prompts), default=1)
  max_new_tokens, note = fitting_max_new_tokens(max_new_tokens, config.model.max_len, longest_prompt)
  if note:
    print(note, file=sys.stderr)
  sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
  model, params, step = inference.load_params(config, tokenizer, workdir, step)
  if text:
    docs = text_documents(text, config, tokenizer, glob, text_field, max_docs)
    results = {'text': text, 'loss_on': 'all tokens',
               **language_model_metrics(model, params, docs, tokenizer.token_bytes(), config.seq_len, batch_size)}
  else:
    results = {'text': f'held-out split ({"whole" if whole_split else "a sample"})',
               'loss_on': loss_scope(config.data), **held_out_split(model, params, config, tokenizer, whole_split)}
  results = {'step': step, **results}
  if examples:
    metrics, samples = generation_metrics(model, params, tokenizer, examples, sampling)
    results.update(metrics)
  else:
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
  flags.DEFINE_integer('max_docs', 100, 'Documents of a --text path evaluated at most.')
  flags.DEFINE_boolean('whole_split', True, "Read every batch of the held-out split, as the run's last validation "
                       'did; --nowhole_split reads the sample of train.eval_batches batches its periodic ones read.')
  flags.DEFINE_integer('batch_size', 8, 'Windows per forward pass.')
  flags.DEFINE_string('references', '', 'JSONL of {"prompt", "reference"} for BLEU and ROUGE.')
  flags.DEFINE_multi_string('prompt', [], "Prompts for the samples file without --references (default: the run's).")
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens generated per prompt (default: as many as fit in the '
                       f'context, up to {DEFAULT_MAX_NEW_TOKENS}).')
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
  results = evaluate(FLAGS.workdir, step=FLAGS.step, text=FLAGS.text, glob=FLAGS.glob, text_field=FLAGS.text_field,
                     max_docs=FLAGS.max_docs, batch_size=FLAGS.batch_size, whole_split=FLAGS.whole_split,
                     references=FLAGS.references, prompts=FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                     temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed)
  print(f'# step {results["step"]} of {FLAGS.workdir}, on the {results["text"]}')
  print(f'loss {results["loss"]:.4f} | perplexity {results["perplexity"]:.2f} | '
        f'bits per byte {results["bits_per_byte"]:.4f} | {results["tokens"]:,} tokens, {results["bytes"]:,} bytes '
        f'({results["loss_on"]})')
  if 'bleu' in results:
    print(f'BLEU {results["bleu"]:.2f} | ROUGE-1 {results["rouge1"]:.4f} | ROUGE-2 {results["rouge2"]:.4f} | '
          f'ROUGE-L {results["rougeL"]:.4f}')
  print(f'results, samples.jsonl and samples.md in {results["directory"]}')


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
