"""A Hub-ready export of every run kind: the folder loads with AutoModelForCausalLM and AutoTokenizer and
computes and tokenizes as the run does, its chat template renders as the run's data.template, its model card
carries the run's own figures, and --push_to_hub is refused clearly before any work.

(GPT-2 and Llama runs with a base model's tokenizer.json, LoRA runs merged, are exported and loaded by
tests/test_convert.py and tests/test_end_to_end.py.)
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from hf_models import require_transformers
from jaxgpt import convert, hub, inference, run_dir
from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder, instructions
from jaxgpt.data.tokenizer import load_tiktoken, train_tokenizer
from jaxgpt.sample import encode_prompt
from test_tokenizer import HELD_OUT, TRAIN_FILES, read, tiktoken_file

CHAT_MARKERS = ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
CONVERSATION = [{'role': 'system', 'content': 'You answer in one line.'},
                {'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'},
                {'role': 'user', 'content': 'And a {braced} one, "quoted"?'},
                {'role': 'assistant', 'content': 'Green —\n\tfresh.'}]


def test_a_sentencepiece_run_exports_with_its_logits_tokens_and_model_card(trained_run, tmp_path):
  """The conftest run: GPT-2 blocks and a SentencePiece model trained from scratch on its data."""
  torch, transformers = require_transformers()
  import huggingface_hub
  out = convert.export_hf(trained_run, str(tmp_path / 'hf'), license='apache-2.0')
  config, tokenizer = run_dir.load_run(trained_run)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)

  # Tokens: what jaxgpt feeds the model for a prompt (BOS first), on code it never saw.
  held_out = read(HELD_OUT)
  assert hf_tokenizer(held_out)['input_ids'] == encode_prompt(tokenizer, held_out)
  assert hf_tokenizer.decode(hf_tokenizer(held_out)['input_ids'], skip_special_tokens=True) == held_out
  ids = encode_prompt(tokenizer, 'def fibonacci(n):\n    return n  # ☃\n')
  loaded = inference.load(config, tokenizer, trained_run)
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(loaded.model.apply({'params': loaded.params}, jnp.array([ids]))),
                             atol=1e-4, rtol=0)
  generation = json.load(open(os.path.join(out, 'generation_config.json')))
  assert (generation['bos_token_id'], generation['eos_token_id'], generation['max_length']) == (
      tokenizer.bos_id, tokenizer.eos_id, config.model.max_len)
  assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (tokenizer.bos_id,
                                                                                          tokenizer.eos_id)

  # The card: the Hub's metadata, and the run's own figures.
  card = huggingface_hub.ModelCard.load(os.path.join(out, 'README.md'))
  assert card.data.license == 'apache-2.0' and card.data.pipeline_tag == 'text-generation'
  assert card.data.library_name == 'transformers' and 'jaxgpt' in card.data.tags
  text = card.text
  results = json.load(open(os.path.join(trained_run, 'results.json')))
  report = json.loads((builder.cache_directory(config.data) / builder.REPORT_FILE).read_text())
  trained_tokens = results['step'] * config.batch_size * config.seq_len
  for figure in (f'{model.num_parameters():,}', f'| loss | {results["loss"]:.4f} |',
                 f'| bits_per_byte | {results["bits_per_byte"]:.4f} |', f'{trained_tokens:,} tokens',
                 f'read {report["read"]["documents"]:,} documents', f'{report["train"]["tokens"]:,}',
                 f'| exact duplicate | {report["dropped"]["exact duplicate"]["count"]} |',
                 'SentencePiece (bpe), trained on the training split', 'Text this model produces is machine-generated'):
    assert figure in text, figure


@pytest.mark.parametrize('kind', ['sentencepiece', 'tiktoken'])
def test_chat_template_renders_and_tokenizes_as_the_run_and_generation_stops_at_its_end_marker(kind, tmp_path):
  """A chat run's tokenizer_config.json: transformers' apply_chat_template gives the text jaxgpt trained on
  (data.template, jaxgpt/data/instructions.py), and the ids jaxgpt would feed the model."""
  _, transformers = require_transformers()
  if kind == 'sentencepiece':
    tokenizer = train_tokenizer([read(f) for f in TRAIN_FILES], vocab_size=600, special_tokens=CHAT_MARKERS)
  else:
    pytest.importorskip('tiktoken')
    tokenizer = load_tiktoken(tiktoken_file(tmp_path / 'tiny.tiktoken'), 'cl100k_base', '<|endoftext|>',
                              special_tokens=CHAT_MARKERS)
  config = base_config()
  config.data.format = 'chat'
  config.data.template.system = '<|system|>\n{content} {{not a field}}\n'  # a literal brace, as str.format reads it
  for name, text in hub.tokenizer_files(tokenizer, config).items():
    (tmp_path / name).write_text(text)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))

  rendered, problem = instructions.render({'messages': CONVERSATION}, config.data)
  assert not problem and '{not a field}' in rendered
  assert hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
      tokenizer.bos_token + instructions.without_markers(rendered))
  prompt = instructions.without_markers(instructions.render({'messages': CONVERSATION[:-1]}, config.data)[0])
  prompt += config.data.template.assistant
  assert hf_tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False) == (
      tokenizer.bos_token + prompt)
  ids = hf_tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, return_dict=True)['input_ids']
  assert ids == encode_prompt(tokenizer, prompt)  # BOS once, then the prompt's tokens
  generation = hub.generation_config(tokenizer, config)
  assert generation['eos_token_id'] == [tokenizer.eos_id, tokenizer.encode('<|end|>')[0]]
  assert len(tokenizer.encode('<|end|>')) == 1


def test_push_to_hub_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
  pytest.importorskip('huggingface_hub')
  # No token anywhere: refused before the run (which does not exist) is even read.
  result = run_module('jaxgpt.convert', f'--workdir={tmp_path / "no-run"}', f'--export_hf={tmp_path / "out"}',
                      '--push_to_hub=me/my-model', env={'HF_TOKEN': '', 'HF_HOME': str(tmp_path / 'hf-home')})
  assert result.returncode == 2 and 'HF_TOKEN' in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()
  monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token')
  assert hub.check_push('me/my-model', str(tmp_path / 'out')) == 'hf_not_a_real_token'
  with pytest.raises(JaxgptError, match='not a Hub repository id'):
    hub.check_push('not a repo!', str(tmp_path / 'out'))
  with pytest.raises(JaxgptError, match='uploads a local folder'):
    hub.check_push('me/my-model', 'gs://bucket/model')
