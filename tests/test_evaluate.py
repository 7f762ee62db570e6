"""Evaluation: perplexity and bits per byte, BLEU and ROUGE, samples files, the command."""

import json
import math
import os

import numpy as np
import optax

from conftest import run_module
from jaxgpt import inference, run_dir
from jaxgpt.data import corpus
from jaxgpt.evaluate import run_data
from jaxgpt.evaluation import generation_metrics, language_model_metrics
from jaxgpt.sample import Sampling, complete


def test_perplexity_and_bits_per_byte_match_a_direct_computation(trained_run):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  model, params = loaded.model, loaded.params
  text = 'def add(a, b):\n    return a + b\n' * 12  # longer than seq_len=64 tokens: several windows
  doc = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  assert len(doc) > 2 * config.seq_len
  metrics = language_model_metrics(model, params, [doc], tokenizer.token_bytes(), config.seq_len, batch_size=2)
  # Directly: each token after the first predicted once, with the context restarting every seq_len tokens.
  total = 0.0
  for start in range(0, len(doc) - 1, config.seq_len):
    window = np.array(doc[start:start + config.seq_len + 1])[None]
    logits = model.apply({'params': params}, window[:, :-1])
    total += float(optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).sum())
  assert metrics['tokens'] == len(doc) - 1 and metrics['bytes'] == len(text.encode())
  np.testing.assert_allclose(metrics['loss'], total / (len(doc) - 1), rtol=1e-5)
  np.testing.assert_allclose(metrics['bits_per_byte'], total / math.log(2) / len(text.encode()), rtol=1e-5)
  assert math.isclose(metrics['perplexity'], math.exp(metrics['loss']))


def test_bleu_and_rouge_are_perfect_on_the_models_own_output_and_lower_elsewhere(trained_run):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  model, params = loaded.model, loaded.params
  # Sampled (a 10-step model's greedy output is mostly blank lines), with a fixed seed, so the same
  # continuation comes back; several words each, as BLEU counts up to 4-grams.
  sampling = Sampling(max_new_tokens=48, temperature=1.0, seed=1)
  prompts = ['import os\n', 'def main(', 'class Foo']
  own = [c.text for c in complete(model, params, tokenizer, prompts, sampling)]
  examples = [{'prompt': p, 'reference': o} for p, o in zip(prompts, own)]
  perfect, samples = generation_metrics(model, params, tokenizer, examples, sampling)
  assert all(len(o.split()) >= 4 for o in own), own
  assert perfect['bleu'] > 99.9 and perfect['rouge1'] > 0.999 and perfect['rougeL'] > 0.999
  assert [s['output'] for s in samples] == own
  other = [{'prompt': p, 'reference': 'the quick brown fox jumps over the lazy dog'} for p in prompts]
  worse, _ = generation_metrics(model, params, tokenizer, other, sampling)
  assert worse['bleu'] < 5.0 and worse['rouge1'] < 0.3


def test_evaluate_command_writes_results_samples_and_tensorboard(trained_run, tmp_path):
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  model, params = loaded.model, loaded.params
  # Sampled: a 10-step model's greedy output is blank lines, which scores 0 against any reference and would
  # make every BLEU and ROUGE figure 0 whatever the command did. One reference is the model's own output.
  sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=1)
  prompts = ['import ', 'def f(']
  own = complete(model, params, tokenizer, prompts, sampling)[0].text
  examples = [{'prompt': prompts[0], 'reference': own}, {'prompt': prompts[1], 'reference': 'def f(x):\n    return x'}]
  references = tmp_path / 'refs.jsonl'
  references.write_text(''.join(json.dumps(e) + '\n' for e in examples))
  texts = tmp_path / 'texts'
  texts.mkdir()
  text = 'import sys\nprint(sys.argv)\n'
  (texts / 'a.txt').write_text(text)
  result = run_module('jaxgpt.evaluate', '--workdir', trained_run, '--references', str(references),
                      '--text', str(texts), '--max_new_tokens', '16', '--temperature', '1.0', '--seed', '1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'bits per byte' in result.stdout and 'BLEU' in result.stdout
  directory = os.path.join(trained_run, 'eval', 'step_10')
  results = json.load(open(os.path.join(directory, 'results.json')))
  # The figures of that text and those references, computed here: not merely numbers in range.
  doc = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  direct = language_model_metrics(model, params, [doc], tokenizer.token_bytes(), config.seq_len, batch_size=8)
  assert results['bytes'] == len(text) and results['tokens'] == direct['tokens'] == len(doc) - 1
  np.testing.assert_allclose(results['bits_per_byte'], direct['bits_per_byte'], rtol=1e-5)
  expected, expected_samples = generation_metrics(model, params, tokenizer, examples, sampling)
  assert 0 < expected['bleu'] < 100 and 0 < expected['rougeL'] < 1, expected
  for name in ('bleu', 'rouge1', 'rouge2', 'rougeL'):
    np.testing.assert_allclose(results[name], expected[name], rtol=1e-6, err_msg=name)
  samples = [json.loads(line) for line in open(os.path.join(directory, 'samples.jsonl'))]
  assert [s['prompt'] for s in samples] == prompts
  assert [s['output'] for s in samples] == [s['output'] for s in expected_samples]
  assert '**Reference**' in open(os.path.join(directory, 'samples.md')).read()
  assert os.listdir(os.path.join(trained_run, 'tensorboard'))


def test_bad_references_file_is_one_clear_error(trained_run, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": 3}\n')
  result = run_module('jaxgpt.evaluate', '--workdir', trained_run, '--references', str(bad))
  assert result.returncode == 2 and 'bad.jsonl:2 needs string fields "prompt" and "reference"' in result.stderr
  assert 'Traceback' not in result.stderr


def test_training_reports_bleu_and_rouge_when_given_references(tiny_config, tmp_path, capsys):
  from jaxgpt.train import train
  references = tmp_path / 'refs.jsonl'
  references.write_text('{"prompt": "import ", "reference": "import os"}\n')
  tiny_config.eval.references, tiny_config.eval.max_new_tokens = str(references), 4
  tiny_config.train.num_steps = tiny_config.train.checkpoint_every = 2
  train(tiny_config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert 'step 2: BLEU' in out and 'ROUGE-L' in out and 'on 1 references' in out


def test_training_reports_figures_on_the_whole_held_out_split(trained_run):
  """The run's last validation reads every held-out token once; jaxgpt.evaluate gives the same figures, and
  per-document windows (another way to cut the context) agree closely, over exactly the text's bytes."""
  config, tokenizer = run_dir.load_run(trained_run)
  loaded = inference.load(config, tokenizer, trained_run)
  model, params = loaded.model, loaded.params
  data = run_data(config, tokenizer)
  split = data.source('validation')
  docs = [list(split[i]['tokens']) for i in range(len(split))]
  reference = language_model_metrics(model, params, docs, tokenizer.token_bytes(), config.seq_len)
  # Every held-out token after each BOS is predicted once: its bytes are exactly those of the cleaned text.
  assert reference['bytes'] == sum(len(t.encode()) for t in corpus.read_clean(data.directory, 'validation'))
  reported = json.load(open(os.path.join(trained_run, 'results.json')))
  rows = config.batch_size * (config.seq_len + 1)
  held_out_tokens = sum(len(doc) for doc in docs)
  assert held_out_tokens - rows < reported['tokens'] * (config.seq_len + 1) / config.seq_len <= held_out_tokens
  # Packed rows and per-document windows cut the context at different places: close, not equal.
  np.testing.assert_allclose(reported['bits_per_byte'], reference['bits_per_byte'], rtol=0.01)
  result = run_module('jaxgpt.evaluate', '--workdir', trained_run)  # the samples' length: what fits the context
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'max_new_tokens=' in result.stderr and 'context of 64 tokens' in result.stderr
  evaluated = json.load(open(os.path.join(trained_run, 'eval', 'step_10', 'results.json')))
  for name in ('loss', 'bits_per_byte', 'tokens', 'bytes'):
    np.testing.assert_allclose(evaluated[name], reported[name], rtol=1e-3)
