"""jaxgpt as an lm-evaluation-harness model: `python -m jaxgpt.evaluate --workdir RUN --tasks NAME[,NAME]`.

`JaxgptLM` answers lm-eval's three requests with a run's model on its mesh:
`loglikelihood` (multiple choice: the log-probability of each continuation and
whether greedy decoding would write it), `loglikelihood_rolling` (perplexity:
a document's whole log-probability, cut into windows of the model's context
as lm-eval's `get_rolling_token_windows` cuts it) and `generate_until`
(jaxgpt.sample's KV-cache decoding, ending at the task's stop strings or
max_gen_toks). Text is encoded as jaxgpt encodes prompts, BOS first; a context
longer than the model's context loses its beginning. Requests are scored in
batches of `batch_size` rows, longest first, each batch split over the mesh's
batch axes.

`evaluate_tasks` runs `lm_eval.simple_evaluate` on standard tasks (HellaSwag,
ARC, LAMBADA, ...: their data comes from the Hugging Face Hub) or on tasks
defined by YAML files in a local `task_dir`. When every task named reads a
local file (dataset_path json, csv, parquet, text or arrow), the Hugging Face
libraries are put in offline mode before lm-eval loads them, so nothing is
fetched from the network. The results go to `RUN/eval/step_N/harness_NAMES.json`.
"""

import difflib
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxgpt import inference, paths, run_dir, sharding
from jaxgpt.config import JaxgptError
from jaxgpt.eval import scoring
from jaxgpt.sample import SEED_LIMIT, Sampling, complete

# datasets' loaders that read the files a task names, never the Hub.
LOCAL_LOADERS = ('json', 'csv', 'parquet', 'text', 'arrow')
OFFLINE_ENV = ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'HF_EVALUATE_OFFLINE')
# Generation settings a task may give (lm-eval's names); the sampler has no beam search or penalties.
GENERATION_SETTINGS = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_p', 'top_k')


class JaxgptLM(TemplateLM):
  """A loaded run (inference.load) as an lm-eval model; call it inside `loaded.activation_rules()`."""

  def __init__(self, loaded: inference.Loaded, tokenizer, batch_size: int = 8, seed: int = 0):
    super().__init__()
    self.loaded, self.text_tokenizer, self.seed = loaded, tokenizer, seed
    ways = sharding.data_parallel_size(loaded.mesh.shape)
    self.batch_size = -(-batch_size // ways) * ways  # every device of the batch axes gets rows
    self.max_length = loaded.model.cfg.max_len

  @property
  def eot_token_id(self) -> int:
    return self.text_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.text_tokenizer.bos_id  # what an empty context is, as every document starts in training

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = self.text_tokenizer.encode(string)
    return ids if add_special_tokens is False else [self.text_tokenizer.bos_id, *ids]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(log-probability, greedy?) of each request's continuation tokens after its context tokens."""
    results = scoring.continuation_scores(self.loaded.model, self.loaded.params,
                                          [(context, continuation) for _, context, continuation in requests],
                                          batch_size=self.batch_size, mesh=self.loaded.mesh, with_greedy=True)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's log-probability after BOS, every token predicted once with as much context as fits."""
    windows, owners = [], []
    for i, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0], add_special_tokens=False)
      for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[i] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context's continuation, up to its first stop string (cut off) or max_gen_toks tokens."""
    contexts = [request.args[0] for request in requests]
    samplings = [self._sampling(request.args[1], (self.seed + i) % SEED_LIMIT) for i, request in enumerate(requests)]
    order = sorted(range(len(requests)), key=lambda i: -len(contexts[i]))
    outputs = [''] * len(requests)
    for first in range(0, len(order), self.batch_size):
      batch = order[first:first + self.batch_size]
      done = complete(self.loaded.model, self.loaded.params, self.text_tokenizer, [contexts[i] for i in batch],
                      [samplings[i] for i in batch])
      for i, continuation in zip(batch, done):
        outputs[i] = continuation.text
        self.cache_hook.add_partial('generate_until', requests[i].args, continuation.text)
    return outputs

  def _sampling(self, gen_kwargs: dict, seed: int) -> Sampling:
    """A task's generation settings as jaxgpt's; a length that leaves no room for context is halved."""
    settings = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
    unsupported = sorted(set(settings) - set(GENERATION_SETTINGS))
    if unsupported:
      raise JaxgptError(f'the task asks for generation settings jaxgpt does not have: '
                        f'{", ".join(f"{k}={settings[k]!r}" for k in unsupported)} (it supports '
                        f'{", ".join(GENERATION_SETTINGS)}). Override them with a task YAML of your own.')
    max_new_tokens = settings['max_gen_toks']
    if max_new_tokens >= self.max_length:
      max_new_tokens = self.max_length // 2
      print(f'max_gen_toks={settings["max_gen_toks"]} does not fit the model\'s context of {self.max_length} '
            f'tokens: generating {max_new_tokens}, after the last {self.max_length - max_new_tokens} of the context.',
            file=sys.stderr)
    stop = tuple(text for text in settings['until'] if text)
    if not settings['do_sample']:  # greedy
      return Sampling(max_new_tokens=max_new_tokens, seed=seed, stop=stop)
    return Sampling(max_new_tokens=max_new_tokens, temperature=float(settings.get('temperature', 1.0)),
                    top_p=float(settings.get('top_p', 1.0)), top_k=int(settings.get('top_k', 0)), seed=seed, stop=stop)

  def get_model_info(self) -> dict:
    return {'model_num_parameters': sum(x.size for x in jax.tree.leaves(self.loaded.params)),
            'model_dtype': self.loaded.model.cfg.dtype, 'max_length': self.max_length}


# --- running tasks ---------------------------------------------------------

def results_file(tasks: Sequence[str]) -> str:
  """Where the results of these tasks go in a run's eval/step_N/: one file per set of tasks, so none is lost."""
  return f'harness_{"+".join(tasks)}.json'


def local_task_configs(task_dir: str) -> dict[str, dict]:
  """task name -> its config ('include's merged in), from the YAML files under `task_dir`."""
  import yaml  # lm-eval's dependency, as the harness extra is

  class Loader(yaml.SafeLoader):  # lm-eval's `!function` tags name Python code: read here as nothing
    pass
  Loader.add_multi_constructor('!', lambda loader, suffix, node: None)

  def read(path) -> dict:
    try:
      config = yaml.load(path.read_text(), Loader) or {}
    except (OSError, yaml.YAMLError) as e:
      raise JaxgptError(f'cannot read the task file {path} ({e}). Fix or remove it.') from None
    if not isinstance(config, dict):
      return {}
    included = config.get('include')
    return {**read(path.parent / included), **config} if isinstance(included, str) else config

  configs = {}
  for path in sorted(pathlib.Path(task_dir).rglob('*.yaml')):
    config = read(path)
    if isinstance(config.get('task'), str):
      configs[config['task']] = config
  return configs


def evaluate_tasks(workdir: str, tasks: Sequence[str], *, task_dir: str = '', num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 8, step: int | None = None, seed: int = 0,
                   mesh: dict | None = None, dtype: str | None = None) -> dict:
  """lm-eval's figures for `tasks` (names lm-eval knows, or defined in `task_dir`), also written to the run's eval/.

  Runs on a mesh of every device (`mesh` sizes) in `dtype` (default: the run's); under
  jax.distributed every process runs this, and process 0 writes. `limit` keeps the first
  `limit` documents of each task (a fraction of them when below 1), for a quick look.
  """
  if not tasks:
    raise JaxgptError('--tasks names no task. Give lm-eval task names, e.g. --tasks hellaswag,arc_easy.')
  if task_dir and not os.path.isdir(task_dir):
    raise JaxgptError(f'--task_dir {task_dir} is not a directory on this machine. Give the local folder that '
                      'holds your task YAML files.')
  config, tokenizer = run_dir.load_run(workdir)  # a wrong --workdir fails before lm-eval loads its libraries
  local = local_task_configs(task_dir) if task_dir else {}
  only_local = all(name in local for name in tasks)  # then lm-eval need not index its 10,000 standard tasks
  offline = only_local and all(local[name].get('dataset_path') in LOCAL_LOADERS for name in tasks)
  if offline:  # read by the Hugging Face libraries when lm-eval imports them, below
    os.environ.update({name: '1' for name in OFFLINE_ENV})
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import handle_non_serializable, make_table

  task_manager = TaskManager(include_path=task_dir or None, include_defaults=not only_local)
  for name in tasks:
    if name not in task_manager.all_tasks:
      close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
      raise JaxgptError(f'lm-eval knows no task {name!r}' + (f' (did you mean {", ".join(close)}?)' if close else '')
                        + ('' if task_dir else '; a task of your own needs --task_dir, the folder of its YAML file')
                        + '. `lm-eval ls tasks` lists the standard ones.')
  loaded = inference.load(config, tokenizer, workdir, step, mesh=inference.make_mesh(mesh, jax.devices()),
                          dtype=dtype)
  with loaded.activation_rules():
    results = simple_evaluate(model=JaxgptLM(loaded, tokenizer, batch_size, seed), tasks=list(tasks),
                              num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,
                              fewshot_random_seed=seed)
  results = {'step': loaded.step, 'offline': offline,
             **json.loads(json.dumps(results, default=handle_non_serializable))}
  results['table'] = make_table(results) + (make_table(results, 'groups') if results.get('groups') else '')
  path = paths.path(workdir) / 'eval' / f'step_{loaded.step}' / results_file(tasks)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
  return {**results, 'file': f'{workdir.rstrip("/")}/eval/step_{loaded.step}/{results_file(tasks)}'}
