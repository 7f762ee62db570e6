"""The lm-evaluation-harness adapter (jaxgpt/eval/harness.py) and human A/B sheets (jaxgpt/eval/human.py).

Every figure is checked against one computed here another way: log-probs by a plain forward
pass of the model over one unpadded row, greedy text by a decode loop without a KV cache, win
rates and Wilson intervals by hand.
"""

import csv
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import inference, run_dir, state
from jaxgpt.config import JaxgptError
from jaxgpt.eval import human
from jaxgpt.model import build_model
from jaxgpt.sample import Sampling, complete

harness = pytest.importorskip('jaxgpt.eval.harness', reason="lm-eval comes with jaxgpt's harness extra")

# Code-like contexts the stdlib-trained run has seen the like of; the last is longer than the context of 64
# tokens, so its beginning is cut off.
MC_CONTEXTS = ['import', 'def __init__(self', 'return', 'for i in', 'class Foo(', 'if x is', 'raise',
               '# ' + ' '.join(f'value_{i} = {i}' for i in range(30)) + '\nprint(']
MC_CHOICES = ['os', 'self', 'None', 'range(']
GEN_PROMPTS = ['import ', 'def f(', 'class ', 'return ', 'if x ', 'print(', 'x = ' * 40]
MAX_GEN_TOKS = 8


def _forward(loaded, rows):
  """Each row's log-probs at every position, from one forward pass of the rows right-padded to the context.

  The model is causal, so what follows a position (padding included) does not change it.
  """
  max_len = loaded.model.cfg.max_len
  tokens = np.zeros((len(rows), max_len), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row[:max_len]
  return np.asarray(_log_softmax(loaded.model, loaded.params, tokens))


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(model, params, tokens):
  return jax.nn.log_softmax(model.apply({'params': params}, tokens), axis=-1)


def _model_logprobs(loaded, tokens):
  """log p(token t+1 | tokens up to t) at every position of one row (at most max_len + 1 tokens), and whether
  each is the most likely token."""
  logprobs = _forward(loaded, [tokens[:-1]])[0, :len(tokens) - 1]
  targets = np.array(tokens[1:])
  return logprobs[np.arange(len(targets)), targets], logprobs.argmax(-1) == targets


def _choice_logprob(loaded, tokenizer, context: str, continuation: str) -> float:
  """lm-eval's definition: the continuation's tokens are those the whole text has beyond the context's, and
  the model sees the last max_len + 1 tokens."""
  whole = [tokenizer.bos_id, *tokenizer.encode(context + continuation)]
  n = len(whole) - 1 - len(tokenizer.encode(context))
  return float(_model_logprobs(loaded, whole[-(loaded.model.cfg.max_len + 1):])[0][-n:].sum())


def _greedy_until(loaded, tokenizer, prompts, stop: str, max_new: int) -> list[str]:
  """Greedy decoding without a KV cache: every row whole through the model for each new token."""
  rows = [[tokenizer.bos_id, *tokenizer.encode(p)][-(loaded.model.cfg.max_len - max_new):] for p in prompts]
  new = [[] for _ in prompts]
  for _ in range(max_new):
    logprobs = _forward(loaded, [row + n for row, n in zip(rows, new)])
    for r, (row, n) in enumerate(zip(rows, new)):
      if tokenizer.eos_id not in n and stop not in tokenizer.decode(n):
        n.append(int(logprobs[r, len(row) + len(n) - 1].argmax()))
  return [tokenizer.decode(n[:n.index(tokenizer.eos_id)] if tokenizer.eos_id in n else n).split(stop)[0]
          for n in new]


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_local_tasks_report_the_models_own_accuracy_and_exact_match(trained_run, tmp_path):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  # Multiple choice: the gold answer is the model's own pick for half the questions and its least likely
  # choice for the others, so a right implementation scores exactly 0.5 and a wrong log-prob changes picks.
  docs, expected_norm = [], []
  for i, context in enumerate(MC_CONTEXTS):
    lls = np.array([_choice_logprob(loaded, tokenizer, context, ' ' + c) for c in MC_CHOICES])
    gold = int(lls.argmax() if i % 2 == 0 else lls.argmin())
    docs.append({'context': context, 'choices': MC_CHOICES, 'answer': gold})
    expected_norm.append(float(np.argmax(lls / [len(c) for c in MC_CHOICES]) == gold))  # lm-eval's acc_norm
  assert len({d['answer'] for d in docs}) > 1  # not one choice everywhere: a constant pick cannot score 0.5
  _write_jsonl(tmp_path / 'mc.jsonl', docs)
  # Generation up to a newline: the reference is the greedy text for the even prompts, and text the model
  # does not write for the odd ones, so exact match is 0.5 only when the adapter decodes what greedy does.
  greedy = _greedy_until(loaded, tokenizer, GEN_PROMPTS, '\n', MAX_GEN_TOKS)
  assert len(set(greedy)) > 2, greedy  # the outputs differ from prompt to prompt
  _write_jsonl(tmp_path / 'gen.jsonl', [{'prompt': p, 'target': g if i % 2 == 0 else g + 'zz'}
                                        for i, (p, g) in enumerate(zip(GEN_PROMPTS, greedy))])
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  (tasks / 'mc.yaml').write_text(f"""
task: code_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
  (tasks / 'defaults.yaml').write_text(f"""
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
""")
  (tasks / 'gen.yaml').write_text(f"""
include: defaults.yaml
task: code_line
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {MAX_GEN_TOKS}, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""")
  assert set(harness.local_task_configs(str(tasks))) == {'code_choice', 'code_line'}  # `include` followed
  results = harness.evaluate_tasks(trained_run, ['code_choice', 'code_line'], task_dir=str(tasks), batch_size=3)
  assert results['offline'] and results['step'] == 10
  assert results['results']['code_choice']['acc,none'] == 0.5
  assert results['results']['code_choice']['acc_norm,none'] == np.mean(expected_norm)
  assert results['results']['code_line']['exact_match,none'] == 4 / 7
  assert results['n-samples']['code_line']['effective'] == len(GEN_PROMPTS)
  written = json.load(open(os.path.join(trained_run, 'eval', 'step_10', 'harness_code_choice+code_line.json')))
  assert written['results'] == results['results'] and '|code_choice|' in results['table'].replace(' ', '')


def test_rolling_loglikelihood_is_the_documents_log_prob_window_by_window(trained_run):
  from lm_eval.api.instance import Instance
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  lm = harness.JaxgptLM(loaded, tokenizer, batch_size=2)
  short, long = 'import os\nprint(os.getcwd())\n', ''.join(f'x{i} = {i} * 2\n' for i in range(9))
  tokens = tokenizer.encode(long)
  max_len = config.model.max_len
  assert max_len < len(tokens) < 2 * max_len
  with loaded.activation_rules():
    rolling = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), i)
                                        for i, text in enumerate([short, long])])
    # Greedy picks of the continuations: ' os' after 'import' is not what a 10-step model writes.
    (_, greedy_os), = lm.loglikelihood([Instance('loglikelihood', {}, ('import', ' os'), 0)])
  # The short text: one pass after BOS. The long one, as lm-eval's docs cut it: the first max_len tokens
  # after BOS, then the rest, each predicted from the max_len tokens before it.
  assert np.isclose(rolling[0], _model_logprobs(loaded, [tokenizer.bos_id, *tokenizer.encode(short)])[0].sum(),
                    rtol=1e-5)
  first = _model_logprobs(loaded, [tokenizer.bos_id, *tokens[:max_len]])[0].sum()
  rest = _model_logprobs(loaded, tokens[-(max_len + 1):])[0][-(len(tokens) - max_len):].sum()
  assert np.isclose(rolling[1], first + rest, rtol=1e-5)
  whole = [tokenizer.bos_id, *tokenizer.encode('import os')]
  assert greedy_os == bool(_model_logprobs(loaded, whole)[1][-(len(whole) - 1 - len(tokenizer.encode('import'))):]
                           .all())
  # A task's generation settings: what the sampler cannot do is refused; a length beyond the context halved.
  with pytest.raises(JaxgptError, match='num_beams=4'):
    lm._sampling({'until': ['\n'], 'num_beams': 4}, seed=0)
  assert lm._sampling({'until': ['\n', ''], 'max_gen_toks': 256}, seed=0) == Sampling(
      max_new_tokens=max_len // 2, stop=('\n',))


def _second_run(trained_run, directory) -> str:
  """A run with the trained run's tokenizer and freshly initialised weights (step 0).

  Its output projection is its own (untied): a random model that shares it with the input embedding
  repeats its last token, the blanks the trained run writes too.
  """
  config, tokenizer = run_dir.load_run(trained_run)
  config.model.tie_embeddings = False
  params = build_model(config, tokenizer.vocab_size).init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32))['params']
  state.save_initial_run(config, tokenizer, nn.unbox(params), str(directory))
  return str(directory)


def test_compare_writes_a_blind_sheet_whose_key_names_each_outputs_run(trained_run, tmp_path):
  other = _second_run(trained_run, tmp_path / 'other')
  prompts = ['import ', 'def f(', 'class ', 'for i in ', 'return ', 'x = [', 'print(', 'if x ']
  _write_jsonl(tmp_path / 'prompts.jsonl', [{'prompt': p} for p in prompts])
  sampling = {'temperature': 0.0, 'max_new_tokens': 6}  # greedy: the random run's text is not the trained one's
  written = human.compare(trained_run, other, str(tmp_path / 'prompts.jsonl'), str(tmp_path / 'ab'), seed=3,
                          **sampling)
  sheet, key = written['sheet'], written['key']
  assert written['prompts'] == len(prompts)
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  with loaded.activation_rules():
    own = [c.text for c in complete(loaded.model, loaded.params, tokenizer, prompts, Sampling(seed=3, **sampling))]
  rows = list(csv.DictReader(open(sheet)))
  mapping = json.load(open(key))
  assert list(rows[0]) == list(human.COLUMNS) and [r['prompt'] for r in rows] == prompts
  assert all(r['preference'] == '' for r in rows) and trained_run not in open(sheet).read()
  for i, row in enumerate(rows):  # the trained run's output where the key says, the other run's (not it) elsewhere
    entry = mapping['rows'][row['id']]
    trained_column, other_column = ('output_1', 'output_2') if entry['output_1'] == trained_run else (
        'output_2', 'output_1')
    assert entry[other_column] == other and row[trained_column] == own[i] and row[other_column] != own[i]
  firsts = [mapping['rows'][r['id']]['output_1'] for r in rows]
  assert 0 < firsts.count(trained_run) < len(rows)  # the order is drawn per row
  assert mapping['steps'] == {trained_run: 10, other: 0}
  with pytest.raises(JaxgptError, match='already holds a sheet'):  # a sheet raters may be filling is kept
    human.compare(trained_run, other, str(tmp_path / 'prompts.jsonl'), str(tmp_path / 'ab'))


def _filled(sheet: str, preferences: list[str], path) -> str:
  rows = list(csv.DictReader(open(sheet)))
  for row, preference in zip(rows, preferences):
    row['preference'] = preference
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=human.COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def test_tally_counts_preferences_through_the_key_with_wilson_intervals(tmp_path):
  prompts = [f'prompt {i}' for i in range(6)]
  sheet, key = human.write_sheet(str(tmp_path / 'ab'), prompts, {'A': [f'a{i}' for i in range(6)],
                                                                 'B': [f'b{i}' for i in range(6)]}, seed=1)
  rows = list(csv.DictReader(open(sheet)))
  # Each rater prefers A's output wherever the sheet put it, except where noted.
  prefer_a = ['1' if r['output_1'].startswith('a') else '2' for r in rows]
  prefer_b = ['2' if p == '1' else '1' for p in prefer_a]
  alice = _filled(sheet, prefer_a[:4] + ['tie', ''], tmp_path / 'alice.csv')  # A 4, tie 1, blank 1
  bob = _filled(sheet, prefer_a[:3] + prefer_b[3:5] + [' TIE '], tmp_path / 'bob.csv')  # A 3, B 2, tie 1
  result = human.tally([alice, bob], key)
  assert result['judged'] == 11 and result['blank'] == 1
  a, b = result['runs']['A'], result['runs']['B']
  assert (a['wins'], a['losses'], a['ties']) == (7, 2, 2) and (b['wins'], b['losses'], b['ties']) == (2, 7, 2)
  # By hand: A scores 7 + 2/2 = 8 of 11. Wilson, z = 1.96: centre (8/11 + z²/22) / (1 + z²/11) = 0.6684,
  # half-width z * sqrt((8/11)(3/11)/11 + z²/484) / (1 + z²/11) = 0.2341; B's mirror it around 1/2.
  assert a['win_rate'] == pytest.approx(8 / 11) and b['win_rate'] == pytest.approx(3 / 11)
  assert a['interval_95'] == pytest.approx((0.4344, 0.9025), abs=1e-4)
  assert b['interval_95'] == pytest.approx((0.0975, 0.5656), abs=1e-4)
  assert '| A | 7 | 2 | 2 | 0.727 | 0.434 to 0.903 |' in human.format_tally(result)
  # One clear error for each mistake, naming the sheet and line.
  with pytest.raises(JaxgptError, match=r'bad\.csv line 3 .*preference .maybe. is not one of 1, 2, tie'):
    human.tally([_filled(sheet, ['1', 'maybe'], tmp_path / 'bad.csv')], key)
  other_sheet, _ = human.write_sheet(str(tmp_path / 'other'), ['another prompt'], {'A': ['x'], 'B': ['y']})
  with pytest.raises(JaxgptError, match='belongs to another comparison'):
    human.tally([_filled(other_sheet, ['1'], tmp_path / 'other.csv')], key)
  with pytest.raises(JaxgptError, match='is judged yet'):
    human.tally([sheet], key)
