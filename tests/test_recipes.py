"""The recipes' task metrics (jaxgpt/eval/tasks.py) and the sandboxed code executor (jaxgpt/eval/code_exec.py).

Metric arithmetic is checked against values worked out by hand; model-scored figures against
the tiny trained run's own outputs and log-probs, computed here another way. The recipes' configs
train, and their evaluate commands run, as docs/recipes.md shows them (tests/test_docs.py).
"""

import json
import os
import resource
import time
from fractions import Fraction
from math import comb

import jax
import numpy as np
import pytest

from conftest import REPO, run_module
from jaxgpt import inference, run_dir
from jaxgpt.config import JaxgptError
from jaxgpt.eval import code_exec, tasks
from jaxgpt.evaluate import evaluate_task
from jaxgpt.sample import Sampling, complete

TINY_LIMITS = code_exec.Limits(seconds=1.0, memory_mb=128, output_mb=1)


def test_pass_at_k_is_the_unbiased_estimator():
  # 1 - C(n-c, k) / C(n, k), by hand: n=5 samples with c=2 passing.
  assert tasks.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
  assert tasks.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
  assert tasks.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)=1, C(5,3)=10
  assert tasks.pass_at_k(5, 2, 4) == 1.0 and tasks.pass_at_k(5, 0, 5) == 0.0 and tasks.pass_at_k(5, 5, 1) == 1.0
  # Codex's sizes, where the product form must agree with exact integer arithmetic.
  exact = 1 - Fraction(comb(200 - 13, 100), comb(200, 100))
  assert tasks.pass_at_k(200, 13, 100) == pytest.approx(float(exact), rel=1e-12)


def test_qa_and_classification_metrics_match_hand_computed_values():
  assert tasks.normalize_answer('  The Cat,  sat on A mat!') == 'cat sat on mat'
  assert tasks.exact_match('The cat.', ['a dog', 'cat']) == 1.0 and tasks.exact_match('cats', ['cat']) == 0.0
  # Predicted {black, cat, sat} against {black, dog, sat, down}: 2 in common, P = 2/3, R = 2/4, F1 = 4/7;
  # the best over the accepted answers counts.
  assert tasks.token_f1('the black cat sat', ['a black dog sat down']) == pytest.approx(4 / 7)
  assert tasks.token_f1('the black cat sat', ['a black dog sat down', 'black cat']) == pytest.approx(0.8)
  assert tasks.token_f1('nothing here', ['cat']) == 0.0
  # Gold p p n u, predicted p n n p: accuracy 1/2; F1 n = 2*1/(2+1), p = 2*1/(2+2), u = 0; macro-F1 = 7/18.
  metrics = tasks.classification_metrics(['p', 'n', 'n', 'p'], ['p', 'p', 'n', 'u'], ['n', 'p', 'u'])
  assert metrics == pytest.approx({'accuracy': 0.5, 'macro_f1': 7 / 18})


def _pid_state(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0]
  except FileNotFoundError:
    return 'gone'


def test_each_program_runs_apart_and_a_bad_one_harms_no_other():
  programs = {
      'good': 'def inc(x):\n    return x + 1\nassert inc(1) == 2\n',
      'wrong': 'def inc(x):\n    return x\nassert inc(1) == 2\n',
      'infinite loop': 'while True:\n    pass\n',
      'memory bomb': 'hog = bytearray(1 << 30)\n',
      'growing memory': 'hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))\n',
      'kills itself': 'import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n',
      'exits early': 'import sys\nsys.exit(0)\nassert False\n',
      'exits hard': 'import os\nos._exit(0)\n',
      'floods output': 'while True:\n    print("x" * 1000)\n',
      # Leaves a child behind and says its pid: the child must die with the program's process group.
      'leaves a child': ('import os, sys, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n'
                         'sys.exit(f"child {pid}")\n'),
  }
  start = time.perf_counter()
  outcomes = dict(zip(programs, code_exec.run_programs(list(programs.values()), TINY_LIMITS, workers=len(programs))))
  assert time.perf_counter() - start < 30  # the loop was stopped, not waited for
  results = {name: outcome.result for name, outcome in outcomes.items()}
  assert {name for name, outcome in outcomes.items() if outcome.passed} == {'good'}, results
  assert results['wrong'] == 'AssertionError'
  assert results['infinite loop'] == 'timed out after 1 s'
  assert results['memory bomb'] == results['growing memory'] == 'MemoryError'
  assert results['kills itself'] == 'killed by SIGKILL'
  assert results['exits early'] == results['exits hard'] == 'exited before the end of the tests'
  assert 'File too large' in results['floods output']
  child = int(results['leaves a child'].split()[-1])
  assert _pid_state(child) in ('gone', 'Z'), 'the program\'s child outlived it'
  # The limits were the child's: this process can still allocate as before.
  assert resource.getrlimit(resource.RLIMIT_AS)[0] != 128 << 20


def test_the_example_problems_pass_with_their_solutions_and_fail_without():
  problems = tasks.read_examples('code', os.path.join(REPO, 'examples', 'code', 'problems.jsonl'))
  solved = code_exec.run_programs([tasks.program(p, p['canonical_solution']) for p in problems], TINY_LIMITS)
  unsolved = code_exec.run_programs([tasks.program(p, '    return None\n') for p in problems], TINY_LIMITS)
  assert [o.result for o in solved] == ['passed'] * len(problems)
  assert not any(o.passed for o in unsolved)


def _write_jsonl(path, records) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


# The completion lands inside a raw string that the test code closes, so it passes (or fails) whatever the
# 10-step model writes: the figures are known in advance.
ALWAYS, NEVER = ({'task_id': f't/{i}', 'prompt': 'def answer():\n    return 1\n\n\nr"""', 'entry_point': 'answer',
                  'test': f'"""\n\ndef check(f):\n    assert f() == {wanted}\n'} for i, wanted in enumerate((1, 2)))


def test_code_command_reports_pass_at_k_of_the_models_own_completions(trained_run, tmp_path):
  data = _write_jsonl(tmp_path / 'problems.jsonl', [ALWAYS, NEVER])
  result = run_module('jaxgpt.evaluate', '--workdir', trained_run, '--task', 'code', '--data', data,
                      '--num_samples', '3', '--pass_k', '1,3', '--temperature', '1.0', '--seed', '5',
                      '--max_new_tokens', '8', '--exec_seconds', '3')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'pass@1 0.5000 | pass@3 0.5000 (2 problems, 3 samples each, 3 passed)' in result.stdout
  directory = os.path.join(trained_run, 'eval', 'step_10', 'code')
  results = json.load(open(os.path.join(directory, 'results.json')))
  assert results['pass@1'] == results['pass@3'] == 0.5 and results['task'] == 'code'
  samples = [json.loads(line) for line in open(os.path.join(directory, 'samples.jsonl'))]
  # The completions are the model's: decoded here with each sample's own seed, they are the same.
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  samplings = [Sampling(max_new_tokens=8, temperature=1.0, seed=5 + i, stop=tasks.CODE_STOPS) for i in range(3)]
  own = [c.text for c in complete(loaded.model, loaded.params, tokenizer, [ALWAYS['prompt']] * 3, samplings)]
  assert [s['output'] for s in samples] == own * 2 and len(set(own)) > 1, own
  assert not any('"""' in text for text in own), 'a completion closed the string: pick another seed'
  assert [s['result'] for s in samples] == ['passed'] * 3 + ['AssertionError'] * 3


def test_qa_and_summarization_ask_as_training_renders_and_score_the_responses(trained_run, tmp_path):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  records = [{'instruction': 'Which module?', 'input': 'import os', 'output': 'x'},
             {'instruction': 'Who?', 'output': 'x'}]
  # The prompts written out from data.template by hand: the user turn, then the assistant's opening.
  prompts = ['<|user|>\nWhich module?\n\nimport os\n<|assistant|>\n', '<|user|>\nWho?\n<|assistant|>\n']
  assert [tasks.response_prompt(r, config.data) for r in records] == prompts
  sampling = Sampling(max_new_tokens=8, temperature=1.0, seed=3, stop=('<|end|>',))
  own = [c.text.strip() for c in complete(loaded.model, loaded.params, tokenizer, prompts, sampling)]
  assert all(own), own
  request = dict(temperature=1.0, seed=3, max_new_tokens=8)
  # The first answer is the model's own (with other case and punctuation), the second another text.
  qa = [{**records[0], 'output': 'wrong', 'answers': ['wrong', f'The {own[0].upper()}!']},
        {**records[1], 'output': f'{own[1]} and more'}]
  results = evaluate_task(trained_run, tasks.Request('qa', _write_jsonl(tmp_path / 'qa.jsonl', qa), **request))
  words = len(tasks.normalize_answer(own[1]).split())
  assert results['exact_match'] == 0.5
  assert results['f1'] == pytest.approx((1 + 2 * words / (2 * words + 2)) / 2)  # P = 1, R = words / (words + 2)
  summaries = [{**r, 'output': text} for r, text in zip(records, own)]
  results = evaluate_task(trained_run, tasks.Request('summarization', _write_jsonl(tmp_path / 's.jsonl', summaries),
                                                     **request))
  assert results['rougeL'] == pytest.approx(1.0) and results['rouge1'] == pytest.approx(1.0)
  assert os.path.isfile(os.path.join(results['directory'], 'samples.md'))


def test_sentiment_scores_are_the_models_log_probs_of_each_label(trained_run, tmp_path):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  model, params, max_len = loaded.model, loaded.params, loaded.model.cfg.max_len
  # The last review is longer than the context of 64 tokens: its beginning is cut off.
  texts = ('import os', 'raise Error', 'pass', 'x = 1\n' * 40)
  records = [{'instruction': 'Mood?', 'input': text, 'output': label}
             for text, label in zip(texts, ('good', 'bad', 'good', 'bad'))]
  # Eight rows in batches of 3: the last batch is part padding.
  request = tasks.Request('sentiment', _write_jsonl(tmp_path / 'sentiment.jsonl', records), batch_size=3)
  with loaded.activation_rules():
    metrics, samples = tasks.evaluate(request, records, loaded, tokenizer, config)
  assert metrics['labels'] == ['bad', 'good']
  # Independently: each (review, label) row, cut to the context from the left, through the model in one
  # forward pass (padded at the end, which a causal model does not see), log-softmax at the label's tokens.
  rows, spans = [], []
  for text in texts:
    context = [tokenizer.bos_id, *tokenizer.encode(f'<|user|>\nMood?\n\n{text}\n<|assistant|>\n')]
    for label in ('bad', 'good'):
      response = tokenizer.encode(label + '<|end|>\n')
      rows.append((context + response)[-(max_len + 1):])
      spans.append(len(response))
  assert len(context) > max_len
  tokens = np.zeros((len(rows), max_len), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row) - 1] = row[:-1]
  logprobs = np.asarray(jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({'params': p}, t), -1))(params, tokens))
  expected = [sum(logprobs[r, len(row) - 1 - n + i, row[len(row) - n + i]] for i in range(n))
              for r, (row, n) in enumerate(zip(rows, spans))]
  scores = [s['log_likelihoods'][label] for s in samples for label in ('bad', 'good')]
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  for sample in samples:
    assert sample['output'] == max(sample['log_likelihoods'], key=sample['log_likelihoods'].get)
  predicted, gold = [s['output'] for s in samples], [r['output'] for r in records]
  assert metrics['accuracy'] == sum(p == g for p, g in zip(predicted, gold)) / len(records)
  expected = tasks.classification_metrics(predicted, gold, ['bad', 'good'])
  assert (metrics['accuracy'], metrics['macro_f1']) == (expected['accuracy'], expected['macro_f1'])


def test_bad_task_inputs_are_one_clear_error(tmp_path):
  cases = [
      (lambda: tasks.Request('code', 'p.jsonl', num_samples=2, ks=(1, 5), temperature=0.8), 'pass@5 needs at least 5'),
      (lambda: tasks.Request('code', 'p.jsonl', num_samples=4), '--temperature=0 would decode the same'),
      (lambda: tasks.Request('hellaswag', 'p.jsonl'), "--task='hellaswag' is not one of"),
      (lambda: tasks.Request('qa', ''), '--task=qa needs --data'),
      (lambda: tasks.read_examples('code', str(tmp_path / 'missing.jsonl')), 'cannot read the --data file'),
      (lambda: tasks.read_examples('code', _write_jsonl(tmp_path / 'c.jsonl', [{**ALWAYS, 'test': 3}])),
       "c.jsonl:1 needs non-empty string fields 'task_id', 'prompt', 'test', 'entry_point'"),
      (lambda: tasks.read_examples('qa', _write_jsonl(tmp_path / 'q.jsonl', [
          {'instruction': 'q', 'output': 'a'}, {'instruction': 'q', 'output': 'a', 'answers': 'a'}])),
       'q.jsonl:2: "answers" must be a list'),
      (lambda: tasks.read_examples('sentiment', _write_jsonl(tmp_path / 's.jsonl', [
          {'instruction': 'q', 'output': 'good'}] * 2)), "every record has the label 'good'"),
  ]
  for make, message in cases:
    with pytest.raises(JaxgptError) as error:
      make()
    assert message in str(error.value), (message, str(error.value))
