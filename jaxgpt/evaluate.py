"""Evaluation of a trained run: `python -m jaxgpt.evaluate --workdir DIR [--text PATH] [--references FILE.jsonl]`.

- Loss, perplexity and bits per byte on the run's held-out split, prepared
  exactly as training prepared it (a fine-tuned run's with its base model's
  tokenizer) and read as the run's last validation read it, so the figures
  agree with the run's own; or on any directory of text files or JSONL file.
- BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) of greedy continuations
  against references, from a JSONL file of {"prompt": ..., "reference": ...}.
- A samples file (JSONL and Markdown) for people to judge fluency and coherence.
- With `--task code|summarization|qa|sentiment --data FILE.jsonl`, that task's metric
  instead (jaxgpt/eval/tasks.py: pass@k of sandboxed programs, ROUGE, exact match and
  F1, label log-likelihood), into `DIR/eval/step_N/TASK/` (docs/recipes.md).
- With `--tasks NAME[,NAME] [--task_dir DIR]`, lm-evaluation-harness tasks instead
  (jaxgpt/eval/harness.py), into `DIR/eval/step_N/harness_NAMES.json`.
- Human A/B evaluation (jaxgpt/eval/human.py): `--compare RUN_A RUN_B --prompts FILE
  [--out DIR]` writes a blind sheet and its key; `--tally SHEET... --key KEY` counts
  filled-in sheets into win rates (docs/evaluation.md).

The computations live in jaxgpt/evaluation.py, shared with training's
validations. Results go to `DIR/eval/step_N/results.json` and to TensorBoard
(`eval/...`). It all runs on a mesh of every device (`--mesh.*`); with
`--distributed.*` several processes run it together and process 0 writes
(docs/sharding.md).
"""

import json
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags
from jax.experimental import multihost_utils

from jaxgpt import inference, paths, run_dir, sharding
from jaxgpt.config import JaxgptError, require_extra, run_cli
from jaxgpt.data import builder, sources
from jaxgpt.eval import code_exec, human, tasks
from jaxgpt.evaluation import (eval_sums, generation_metrics, held_out_metrics, language_model_metrics,
                               loss_scope, read_references, write_samples)
from jaxgpt.metrics import MetricWriter
from jaxgpt.sample import DEFAULT_MAX_NEW_TOKENS, Sampling, complete, encode_prompt, fitting_max_new_tokens

RESULTS_FILE = 'results.json'


def run_data(config, tokenizer) -> builder.PreparedData:
  """The run's dataset as training prepared it (built again, by process 0 first, if the cache is gone)."""
  # Training tokenized a fine-tuned run's data with the base model's tokenizer, saved as the run's own.
  prepare = lambda: builder.prepare(config.data, log=lambda message: None,
                                    tokenizer=tokenizer if config.init_from else None)
  if jax.process_index() == 0:  # the others then reuse its cache
    data = prepare()
  multihost_utils.sync_global_devices('jaxgpt evaluation data prepared')
  if jax.process_index() != 0:
    data = prepare()
  if data.tokenizer.fingerprint != tokenizer.fingerprint:
    raise JaxgptError('the data settings saved with this run now build another tokenizer (the data changed); '
                      'evaluate on a --text path instead.')
  return data


def held_out_split(loaded: inference.Loaded, config, tokenizer, whole_split: bool) -> dict:
  """The held-out figures in the run's batches, split over the mesh's batch axes as training split them."""
  ways = sharding.data_parallel_size(loaded.mesh.shape)
  if config.batch_size % ways:
    raise JaxgptError(f"the run's batch_size={config.batch_size} does not split over the mesh's batch axes "
                      f'(mesh.data x mesh.fsdp = {ways}, mesh {dict(loaded.mesh.shape)}). Choose --mesh.* sizes '
                      f'whose data x fsdp divides {config.batch_size}, e.g. a larger --mesh.tensor.')
  data = run_data(config, tokenizer)
  token_bytes = tokenizer.token_bytes()
  param_shardings = jax.tree.map(lambda x: x.sharding, loaded.params)
  eval_step = jax.jit(lambda params, batch: eval_sums(loaded.model, params, batch, token_bytes),
                      in_shardings=(param_shardings, sharding.batch_sharding(loaded.mesh)),
                      out_shardings=sharding.replicated(loaded.mesh))
  return held_out_metrics(eval_step, loaded.params, data, config, loaded.mesh, whole_split)


def text_documents(path: str, config, tokenizer, glob: str, text_field: str, max_docs: int) -> list[list[int]]:
  """Every usable document of a directory (files matching `glob`) or a JSONL file, tokenized."""
  path = paths.expand(path)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.source, data_cfg.path = ('jsonl', path) if path.endswith('.jsonl') else ('dir', path)
  data_cfg.glob, data_cfg.text_field = glob, text_field
  if data_cfg.format == 'preference':  # a pair is not a document: --text is read as plain text
    data_cfg.format = 'text'
  if not paths.path(path).exists():
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
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, mesh: dict | None = None,
             dtype: str | None = None) -> dict:
  """Runs every evaluation asked for and writes results, samples and TensorBoard scalars.

  The continuations (of the references' prompts, else of `prompts` or the run's
  sample prompts) are `max_new_tokens` long, or as long as fits the run's context.
  Everything runs on a mesh of every process's devices (`mesh` sizes, default
  inference.DEFAULT_MESH) in `dtype` (default: the run's): under jax.distributed
  every process runs this, and process 0 writes.
  """
  config, tokenizer = run_dir.load_run(workdir)
  examples = read_references(references) if references else []  # a bad file fails before loading the model
  prompts = [e['prompt'] for e in examples] or list(prompts or config.sample.prompts)
  longest_prompt = max((len(encode_prompt(tokenizer, p)) for p in prompts), default=1)
  max_new_tokens, note = fitting_max_new_tokens(max_new_tokens, config.model.max_len, longest_prompt)
  if note:
    print(note, file=sys.stderr)
  sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
  loaded = inference.load(config, tokenizer, workdir, step, mesh=inference.make_mesh(mesh, jax.devices()),
                          dtype=dtype)
  model, params, step = loaded.model, loaded.params, loaded.step
  with loaded.activation_rules():
    if text:
      docs = text_documents(text, config, tokenizer, glob, text_field, max_docs)
      results = {'text': text, 'loss_on': 'all tokens', **language_model_metrics(
          model, params, docs, tokenizer.token_bytes(), config.seq_len, batch_size, loaded.mesh)}
    elif config.data.format == 'preference':
      # Held-out pairs are scored against the reference model, which training's validation holds: its
      # figures are in the run's results.json. Here: the references' or prompts' generation figures.
      results = {'text': "references and prompts only (a preference run's held-out pairs are scored by "
                         "training: its results.json)"}
    else:
      results = {'text': f'held-out split ({"whole" if whole_split else "a sample"})',
                 'loss_on': loss_scope(config.data), **held_out_split(loaded, config, tokenizer, whole_split)}
    results = {'step': step, **results}
    if examples:
      metrics, samples = generation_metrics(model, params, tokenizer, examples, sampling)
      results.update(metrics)
    else:  # a run trained with sample.prompts=() and given no --prompt has nothing to continue
      samples = [{'prompt': p, 'output': c.text} for p, c in zip(prompts, complete(model, params, tokenizer, prompts,
                                                                                     sampling))] if prompts else []
  return _write(workdir, step, results, samples, f'Samples from {workdir} at step {step}')


def evaluate_task(workdir: str, request: tasks.Request, *, step: int | None = None, mesh: dict | None = None,
                  dtype: str | None = None) -> dict:
  """A task's metrics (jaxgpt/eval/tasks.py), written with its samples to the step's eval/TASK/ directory."""
  config, tokenizer = run_dir.load_run(workdir)
  examples = tasks.read_examples(request.task, request.data)  # a bad file fails before loading the model
  loaded = inference.load(config, tokenizer, workdir, step, mesh=inference.make_mesh(mesh, jax.devices()),
                          dtype=dtype)
  with loaded.activation_rules():
    metrics, samples = tasks.evaluate(request, examples, loaded, tokenizer, config)
  results = {'step': loaded.step, 'task': request.task, 'data': request.data, **metrics}
  return _write(workdir, loaded.step, results, samples, f'{request.task} from {workdir} at step {loaded.step}',
                request.task)


def _write(workdir: str, step: int, results: dict, samples: list[dict], title: str, task: str = '') -> dict:
  """Results, samples and TensorBoard scalars (process 0 writes); the results with their directory."""
  name = f'eval/step_{step}' + (f'/{task}' if task else '')
  directory = paths.path(workdir) / name
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    write_samples(directory, samples, title)
    writer = MetricWriter(workdir)
    writer.scalars(step, {f'eval/{task + "/" if task else ""}{k}': v for k, v in results.items()
                          if isinstance(v, float)})
    writer.close()
  return {**results, 'directory': f'{workdir.rstrip("/")}/{name}'}  # as the user named the run


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
  flags.DEFINE_enum('task', None, tasks.TASKS, 'A task metric instead of perplexity, on --data (docs/recipes.md).')
  flags.DEFINE_string('data', '', "The --task's JSONL file: HumanEval-shaped problems for code, Alpaca records "
                      'for the others.')
  flags.DEFINE_integer('num_samples', 1, '--task=code: completions per problem (with --temperature above 0).')
  flags.DEFINE_list('pass_k', ['1'], '--task=code: the k of each pass@k, e.g. 1,10; at most --num_samples.')
  flags.DEFINE_float('exec_seconds', code_exec.Limits.seconds, '--task=code: wall-clock limit of each program.')
  flags.DEFINE_integer('exec_memory_mb', code_exec.Limits.memory_mb, '--task=code: memory limit of each program.')
  flags.DEFINE_list('tasks', [], 'lm-evaluation-harness tasks instead, e.g. hellaswag,arc_easy (docs/evaluation.md).')
  flags.DEFINE_string('task_dir', '', '--tasks: a local folder of task YAML files of your own.')
  flags.DEFINE_integer('num_fewshot', None, "--tasks: examples shown before each question (default: the task's).")
  flags.DEFINE_float('limit', None, '--tasks: documents per task at most (below 1: that fraction of them).')
  flags.DEFINE_string('compare', None, "RUN_A, then RUN_B: a blind A/B sheet of both runs' continuations of "
                      '--prompts (their latest checkpoints).')
  flags.DEFINE_string('prompts', '', '--compare: a JSONL file of {"prompt": ...}.')
  flags.DEFINE_string('out', 'ab', '--compare: the directory for the sheet (sheet.csv) and its key (key.json).')
  flags.DEFINE_string('tally', None, 'SHEET, then any more: win rates from filled-in A/B sheets, with --key.')
  flags.DEFINE_string('key', '', '--tally: the key.json that --compare wrote with the sheet.')
  inference.define_mesh_flags()
  # Several processes (one per host) evaluate together as training trains: the same flags on every one.
  flags.DEFINE_string('distributed.coordinator_address', '', 'host:port of process 0; empty: one process.')
  flags.DEFINE_integer('distributed.num_processes', 0, 'Processes evaluating together.')
  flags.DEFINE_integer('distributed.process_id', -1, "This process's index, from 0.")
  flags.DEFINE_boolean('distributed.auto', False, 'Let jax.distributed find the coordinator (TPU VMs, SLURM).')


def main(argv):
  FLAGS = flags.FLAGS
  more = argv[1:]  # the values after the first of --compare RUN_A RUN_B and --tally SHEET...
  if FLAGS.tally:
    print(human.format_tally(human.tally([FLAGS.tally, *more], FLAGS.key)))
    return
  if len(more) != (1 if FLAGS.compare else 0):
    raise JaxgptError(f'unexpected arguments {" ".join(more)}: only --compare RUN_A RUN_B and --tally SHEET... '
                      'take several values.' if more else '--compare takes two runs: --compare RUN_A RUN_B.')
  if not FLAGS.workdir and not FLAGS.compare:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  if FLAGS.max_docs < 1 or FLAGS.batch_size < 1:
    raise JaxgptError('--max_docs and --batch_size must be positive.')
  sharding.initialize_distributed(ml_collections.ConfigDict(
      {name: FLAGS[f'distributed.{name}'].value for name in ('coordinator_address', 'num_processes', 'process_id',
                                                              'auto')}))
  if FLAGS.compare:
    written = human.compare(FLAGS.compare, more[0], FLAGS.prompts, FLAGS.out, seed=FLAGS.seed,
                            max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                            mesh=inference.mesh_flags(), dtype=FLAGS.dtype)
    if jax.process_index() == 0:
      print(f'{written["prompts"]} prompts continued by both runs, output 1 and 2 in a random order per row\n'
            f'blind sheet for the raters: {written["sheet"]}\nkey (keep it from them): {written["key"]}')
    return
  if FLAGS.tasks:
    require_extra('harness', 'lm_eval')
    from jaxgpt.eval import harness  # imported here: lm-eval is an optional extra
    results = harness.evaluate_tasks(FLAGS.workdir, FLAGS.tasks, task_dir=FLAGS.task_dir, limit=FLAGS.limit,
                                     num_fewshot=FLAGS.num_fewshot, batch_size=FLAGS.batch_size, step=FLAGS.step,
                                     seed=FLAGS.seed, mesh=inference.mesh_flags(), dtype=FLAGS.dtype)
    if jax.process_index() == 0:
      print(f'# step {results["step"]} of {FLAGS.workdir}, lm-eval tasks {", ".join(FLAGS.tasks)}'
            + (' (local files: offline)' if results['offline'] else ''))
      print(f'{results["table"]}\nresults in {results["file"]}')
    return
  if bool(FLAGS.task) != bool(FLAGS.data):
    raise JaxgptError('--task and --data go together: the task, and the JSONL file it is measured on.')
  if FLAGS.task:
    if FLAGS.text or FLAGS.references or FLAGS.prompt:
      raise JaxgptError('--task measures the run on --data alone: drop --text, --references and --prompt, or '
                        'evaluate them in a separate command.')
    ks = [k.strip() for k in FLAGS.pass_k]
    if not all(k.isdigit() for k in ks):
      raise JaxgptError(f'--pass_k={",".join(FLAGS.pass_k)} must be whole numbers, e.g. 1,10.')
    request = tasks.Request(FLAGS.task, FLAGS.data, FLAGS.num_samples, tuple(map(int, ks)), FLAGS.temperature,
                            FLAGS.seed, FLAGS.max_new_tokens, FLAGS.batch_size,
                            code_exec.Limits(FLAGS.exec_seconds, FLAGS.exec_memory_mb))
    results = evaluate_task(FLAGS.workdir, request, step=FLAGS.step, mesh=inference.mesh_flags(), dtype=FLAGS.dtype)
    if jax.process_index() == 0:
      print(f'# step {results["step"]} of {FLAGS.workdir}, {FLAGS.task} on {FLAGS.data}')
      print(tasks.summary(FLAGS.task, results))
      print(f'results, samples.jsonl and samples.md in {results["directory"]}')
    return
  results = evaluate(FLAGS.workdir, step=FLAGS.step, text=FLAGS.text, glob=FLAGS.glob, text_field=FLAGS.text_field,
                     max_docs=FLAGS.max_docs, batch_size=FLAGS.batch_size, whole_split=FLAGS.whole_split,
                     references=FLAGS.references, prompts=FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                     temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed, mesh=inference.mesh_flags(),
                     dtype=FLAGS.dtype)
  if jax.process_index() != 0:
    return
  print(f'# step {results["step"]} of {FLAGS.workdir}, on the {results["text"]}')
  if 'loss' in results:
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
