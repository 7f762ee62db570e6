"""Task metrics for the recipes (docs/recipes.md): pass@k, ROUGE, exact match and F1, label log-likelihood.

`read_examples` reads and checks a task's JSONL file; `evaluate` measures a loaded run on it.
- code: HumanEval-shaped problems ({"task_id", "prompt", "test", "entry_point"}). Each is
  continued `num_samples` times, cut at Codex's stop sequences; each program (prompt, completion,
  test, `check(entry_point)`) runs in its own limited process (jaxgpt/eval/code_exec.py). pass@k
  is the unbiased estimator of Chen et al. 2021, averaged over problems.
- summarization: Alpaca records (instruction, input: the document, output: the reference
  summary); ROUGE-1/2/L and BLEU of the response (jaxgpt/evaluation.py's, as --references).
- qa: Alpaca records (instruction: the question, input: the document, output: the answer, and
  optionally "answers": every accepted answer); SQuAD's exact match and token F1, each the best
  over the accepted answers.
- sentiment: Alpaca records whose outputs are label words. No classifier head: each label is
  scored by the model's log-likelihood of it as the response (the label and the template's end
  marker) after the prompt, and the likeliest is the prediction; accuracy and macro-F1.

An Alpaca record's prompt is what training renders before its response (jaxgpt/data/instructions.py)
with the run's data.template, so a fine-tuned run is asked as it was taught; responses end at the
template's end marker. Code prompts go to the model as they are.
"""

import collections
import dataclasses
import json
import re
import string

import numpy as np

from jaxgpt.config import JaxgptError, require_extra
from jaxgpt.data import instructions
from jaxgpt.eval import code_exec, scoring
from jaxgpt.evaluation import generation_metrics, json_lines
from jaxgpt.sample import Sampling, complete, encode_prompt, fitting_max_new_tokens

TASKS = ('code', 'summarization', 'qa', 'sentiment')
# Chen et al. 2021: a completion ends where a new top-level statement would begin.
CODE_STOPS = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')
_FIELDS = {'code': ('task_id', 'prompt', 'test', 'entry_point'), 'summarization': ('instruction', 'output'),
           'qa': ('instruction', 'output'), 'sentiment': ('instruction', 'output')}


@dataclasses.dataclass(frozen=True)
class Request:
  """A task evaluation: the task, its JSONL file and how its responses are drawn."""
  task: str
  data: str
  num_samples: int = 1  # code: completions per problem
  ks: tuple[int, ...] = (1,)  # code: the k of each pass@k reported
  temperature: float = 0.0  # 0 is greedy
  seed: int = 0
  max_new_tokens: int | None = None  # None: as many as fit the context, up to sample.DEFAULT_MAX_NEW_TOKENS
  batch_size: int = 8  # sentiment: rows per forward pass
  limits: code_exec.Limits = code_exec.Limits()

  def __post_init__(self):
    if self.task not in TASKS:
      raise JaxgptError(f'--task={self.task!r} is not one of {", ".join(TASKS)} (lm-evaluation-harness tasks go to '
                        '--tasks).')
    if not self.data:
      raise JaxgptError(f'--task={self.task} needs --data: its JSONL file (docs/recipes.md shows each format).')
    if self.num_samples < 1 or self.batch_size < 1 or not self.ks or min(self.ks) < 1:
      raise JaxgptError('--num_samples, --batch_size and each --pass_k must be positive.')
    if self.task == 'code' and max(self.ks) > self.num_samples:
      raise JaxgptError(f'pass@{max(self.ks)} needs at least {max(self.ks)} samples per problem: set '
                        f'--num_samples={max(self.ks)} or more (--num_samples={self.num_samples} now).')
    if self.num_samples > 1 and self.temperature == 0:
      raise JaxgptError(f'--num_samples={self.num_samples} with --temperature=0 would decode the same greedy '
                        'completion each time: set --temperature, e.g. 0.8 (Codex used 0.8 for pass@10 and up).')
    if self.limits.seconds <= 0 or self.limits.memory_mb < 1:
      raise JaxgptError('--exec_seconds and --exec_memory_mb must be positive.')


def read_examples(task: str, path: str) -> list[dict]:
  """The task's records from a JSONL file, each checked; a bad line is named with what it lacks."""
  examples = []
  for number, record in json_lines(path, 'the --data file'):
    if not isinstance(record, dict) or not all(isinstance(record.get(f), str) and record[f].strip()
                                               for f in _FIELDS[task]):
      raise JaxgptError(f'{path}:{number} needs non-empty string fields {", ".join(map(repr, _FIELDS[task]))} for '
                        f'--task={task} (docs/recipes.md).')
    answers = record.get('answers', [])
    if task == 'qa' and not (isinstance(answers, list) and all(isinstance(a, str) and a.strip() for a in answers)):
      raise JaxgptError(f'{path}:{number}: "answers" must be a list of non-empty strings (the accepted answers).')
    examples.append(record)
  if not examples:
    raise JaxgptError(f'{path} has no records.')
  if task == 'sentiment' and len({e['output'] for e in examples}) < 2:
    raise JaxgptError(f'{path}: every record has the label {examples[0]["output"]!r}; the labels scored are the '
                      'outputs of the file, so it needs at least two.')
  if task == 'summarization':
    require_extra('eval', 'sacrebleu', 'rouge_score')  # checked before a run that will need them
  return examples


# --- the metrics ----------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
  """The chance that at least one of k of the n samples passes, when c passed: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = ''.join(ch for ch in text.lower() if ch not in string.punctuation)
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
  return max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)


def token_f1(prediction: str, answers: list[str]) -> float:
  """The best F1 over the answers of the normalised words in common."""
  def f1(predicted, wanted):
    same = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if not same:
      return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)
  return max(f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)


def classification_metrics(predicted: list[str], gold: list[str], labels: list[str]) -> dict:
  """Accuracy, and macro-F1: the mean over labels of each label's F1 (0 for a label never predicted right)."""
  f1s = []
  for label in labels:
    true_positives = sum(p == g == label for p, g in zip(predicted, gold))
    predicted_as, actually = predicted.count(label), gold.count(label)
    f1s.append(2 * true_positives / (predicted_as + actually) if true_positives else 0.0)
  return {'accuracy': sum(p == g for p, g in zip(predicted, gold)) / len(gold), 'macro_f1': float(np.mean(f1s))}


# --- the tasks ------------------------------------------------------------------------------------

def response_prompt(record: dict, data_cfg) -> str:
  """What training renders before an Alpaca record's response, with the run's template."""
  alpaca = data_cfg.copy_and_resolve_references()
  alpaca.format = 'alpaca'
  text, problem = instructions.render(record, alpaca)
  if problem:
    raise JaxgptError(f'cannot render the record {json.dumps(record)[:200]} as a prompt: {problem}.')
  return text.split(instructions.RESPONSE_START)[0]


def _end_marker(data_cfg) -> str:
  return data_cfg.template.end.strip() or data_cfg.template.end


def evaluate(request: Request, examples: list[dict], loaded, tokenizer, config) -> tuple[dict, list[dict]]:
  """(metrics, samples) of the task on `examples` (from `read_examples`) for a loaded run."""
  model, params = loaded.model, loaded.params
  if request.task == 'sentiment':
    return _sentiment(examples, model, params, tokenizer, config.data, request.batch_size, loaded.mesh)
  prompts = [e['prompt'] if request.task == 'code' else response_prompt(e, config.data) for e in examples]
  max_new_tokens, _ = fitting_max_new_tokens(request.max_new_tokens, model.cfg.max_len,
                                             max(len(encode_prompt(tokenizer, p)) for p in prompts))
  stop = CODE_STOPS if request.task == 'code' else (_end_marker(config.data),)
  sampling = Sampling(max_new_tokens=max_new_tokens, temperature=request.temperature, seed=request.seed, stop=stop)
  metrics = {'examples': len(examples), 'max_new_tokens': max_new_tokens}
  if request.task == 'code':
    return _code(examples, model, params, tokenizer, request, sampling, metrics)
  if request.task == 'summarization':
    scores, samples = generation_metrics(model, params, tokenizer,
                                         [{'prompt': p, 'reference': e['output']} for p, e in zip(prompts, examples)],
                                         sampling)
    return {**scores, **metrics}, samples
  outputs = [c.text.strip() for c in complete(model, params, tokenizer, prompts, sampling)]
  answers = [e.get('answers') or [e['output']] for e in examples]
  samples = [{'prompt': p, 'reference': ' | '.join(a), 'output': o, 'exact_match': exact_match(o, a),
              'f1': token_f1(o, a)} for p, a, o in zip(prompts, answers, outputs)]
  return {'exact_match': float(np.mean([s['exact_match'] for s in samples])),
          'f1': float(np.mean([s['f1'] for s in samples])), **metrics}, samples


def program(problem: dict, completion: str) -> str:
  """HumanEval's program: the prompt, the completion, the tests, and the call of check on the function."""
  return f'{problem["prompt"]}{completion}\n\n{problem["test"]}\n\ncheck({problem["entry_point"]})\n'


def _code(problems, model, params, tokenizer, request: Request, sampling: Sampling, metrics: dict):
  n = request.num_samples
  repeated = [p for p in problems for _ in range(n)]
  completions = []
  for problem in problems:  # a problem's samples decode together, each with its own seed
    samplings = [dataclasses.replace(sampling, seed=(request.seed + i) % 2**32) for i in range(n)]
    completions += [c.text for c in complete(model, params, tokenizer, [problem['prompt']] * n, samplings)]
  outcomes = code_exec.run_programs([program(p, c) for p, c in zip(repeated, completions)], request.limits)
  passed = [sum(o.passed for o in outcomes[i * n:(i + 1) * n]) for i in range(len(problems))]
  scores = {f'pass@{k}': float(np.mean([pass_at_k(n, c, k) for c in passed])) for k in request.ks}
  samples = [{'task_id': p['task_id'], 'prompt': p['prompt'], 'output': c, 'result': o.result}
             for p, c, o in zip(repeated, completions, outcomes)]
  return {**scores, 'samples_per_problem': n, 'passed': int(sum(passed)), **metrics}, samples


def _sentiment(examples, model, params, tokenizer, data_cfg, batch_size: int, mesh):
  labels = sorted({e['output'] for e in examples})
  prompts = [response_prompt(e, data_cfg) for e in examples]
  end = data_cfg.template.end  # the response as training tokenized it: the label, then the end marker
  responses = [tokenizer.encode(label + end) for label in labels]
  pairs = [(encode_prompt(tokenizer, p), r) for p in prompts for r in responses]
  scored = scoring.continuation_scores(model, params, pairs, batch_size=batch_size, mesh=mesh)
  scores = np.array([logprob for logprob, _ in scored]).reshape(len(examples), len(labels))
  predicted = [labels[i] for i in scores.argmax(1)]
  samples = [{'prompt': p, 'reference': e['output'], 'output': label,
              'log_likelihoods': dict(zip(labels, map(float, row)))}
             for p, e, label, row in zip(prompts, examples, predicted, scores)]
  return {**classification_metrics(predicted, [e['output'] for e in examples], labels), 'labels': labels,
          'examples': len(examples)}, samples


def summary(task: str, metrics: dict) -> str:
  """The figures in one line, as the command prints them."""
  if task == 'code':
    figures = ' | '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k.startswith('pass@'))
    return (f'{figures} ({metrics["examples"]} problems, {metrics["samples_per_problem"]} samples each, '
            f'{metrics["passed"]} passed)')
  if task == 'summarization':
    return (f'ROUGE-1 {metrics["rouge1"]:.4f} | ROUGE-2 {metrics["rouge2"]:.4f} | ROUGE-L {metrics["rougeL"]:.4f} | '
            f'BLEU {metrics["bleu"]:.2f} ({metrics["examples"]} examples)')
  if task == 'qa':
    return f'exact match {metrics["exact_match"]:.4f} | F1 {metrics["f1"]:.4f} ({metrics["examples"]} examples)'
  return (f'accuracy {metrics["accuracy"]:.4f} | macro-F1 {metrics["macro_f1"]:.4f} ({metrics["examples"]} examples; '
          f'labels {", ".join(metrics["labels"])})')

