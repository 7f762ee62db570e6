"""Each config a user can run on a CPU, end to end at a tiny size: train, evaluate, sample, serve, export.

Where a doc already trains a config, its run is reused: the steps here continue tests/test_docs.py's
flows in the same sandboxes (README's quickstart run, docs/finetuning.md's fine-tune, SFT and LoRA
runs, docs/data.md's prepared prose), so no config is trained twice. configs/llama_tiny.py, which
no page trains, gets a flow of its own. Every command must exit 0 and print finite figures.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import REPO
from test_docs import (FINETUNE_TINY, PROSE_DATA, QUICKSTART_TINY, Request, Run, Serve, Step, append, check_step,
                       doc_step, home_as)

SIZES = {k: v for k, v in QUICKSTART_TINY.items() if not k.startswith('data.')}
# llama_tiny's own 4 heads (grouped-query, 2 kv heads), the tiny GPT-2's byte-level BPE: a Llama run that exports.
LLAMA_TINY = {**{k: v for k, v in QUICKSTART_TINY.items() if k != 'model.num_heads'},
              'data.tokenizer.kind': 'byte_bpe', 'data.tokenizer.path': '~/models/gpt2/tokenizer.json'}


def _serve_and_ask(run: str, prompt: str) -> list[Step]:
  """`python -m jaxgpt.serve` on a free port ({port}: chosen when it starts), and one completion request."""
  return [Step(f'{run}: serve', f'python -m jaxgpt.serve --workdir {run} --port {{port}}', Serve()),
          Step(f'{run}: one request', f"curl -s localhost:{{port}}/v1/completions -H 'Content-Type: application/json' "
                                      f"-d '{{\"prompt\": \"{prompt}\", \"max_tokens\": 8, \"seed\": 1}}'",
               Request(expect=_completed))]


def _chat_and_ask(run: str, content: str) -> list[Step]:
  """The server, and one chat completion: rendered with the run's own chat template."""
  body = json.dumps({'messages': [{'role': 'user', 'content': content}], 'max_tokens': 8, 'seed': 1})
  return [Step(f'{run}: serve', f'python -m jaxgpt.serve --workdir {run} --port {{port}}', Serve()),
          Step(f'{run}: one chat request', f"curl -s localhost:{{port}}/v1/chat/completions "
                                           f"-H 'Content-Type: application/json' -d '{body}'",
               Request(expect=_chat_completed))]


def _chat_completed(result, flow) -> None:
  answer = json.loads(result.stdout)
  message = answer['choices'][0]['message']
  assert message['role'] == 'assistant' and isinstance(message['content'], str), answer
  assert answer['object'] == 'chat.completion' and answer['usage']['completion_tokens'] > 0, answer


def _references_scored(result, flow) -> None:
  assert re.search(r'^BLEU [\d.]+ \| ROUGE-1 [\d.]+', result.stdout, re.M), result.stdout[-1000:]


def _completed(result, flow) -> None:
  answer = json.loads(result.stdout)
  assert isinstance(answer['choices'][0]['text'], str) and answer['usage']['completion_tokens'] > 0, answer


def _evaluate(run: str) -> Step:
  return Step(f'{run}: evaluate', f'python -m jaxgpt.evaluate --workdir {run}', Run(expect=_no_tokenizer_trained))


def _no_tokenizer_trained(result, flow) -> None:
  # Evaluating a fine-tuned run once retrained a SentencePiece tokenizer on the held-out text.
  assert 'trained a' not in result.stdout + result.stderr and 'on the held-out split' in result.stdout


def _refused(message: str):
  def expect(result, flow):
    assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-2000:]
  return expect


def _two_prompts_continued(result, flow) -> None:
  out = result.stdout
  assert out.startswith('# step 10 of runs/llama_tiny')
  first, second = out.split("--- prompt: 'def main('\n", 1)[1].split("--- prompt: 'import'\n")
  assert first.startswith('def main(') and len(first) > len('def main(\n') and second.startswith('import')


def _data_reused(result, flow) -> None:
  assert 'data: reusing' in result.stdout  # docs/data.md's prepare command built it


# The run each export came from, and where it went. The quickstart's and web_text's runs have SentencePiece
# tokenizers, which Hugging Face export refuses (it needs a byte-level BPE).
EXPORTS = {'finetune_gpt2': ('finetuning', 'runs/ft', 'exported/ft'),
           'sft_alpaca': ('finetuning', 'runs/sft', '~/models/gpt2-sft'),
           'lora': ('finetuning', 'runs/lora', '~/models/gpt2-lora'),
           'dpo': ('finetuning', 'runs/dpo', 'exported/dpo'),
           'llama_tiny': ('llama_tiny', 'runs/llama_tiny', 'exported/llama_tiny')}

CHAINS = {
    'quickstart': [
        # Moved from tests/test_cli.py: the run README's commands made refuses data it was not trained on.
        Step('resuming with other data settings is refused',
             'python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart '
             '--config.data.source=jsonl --config.data.path=corpus.jsonl '
             + append({**QUICKSTART_TINY, 'train.num_steps': 30}),
             Run(exit_code=2, expect=_refused('different tokenizer'))),
    ],
    'finetuning': [
        _evaluate('runs/ft'),
        Step('runs/ft: sample', 'python -m jaxgpt.sample --workdir runs/ft --prompt "The quick"', Run()),
        *_serve_and_ask('runs/ft', 'The quick'),
        Step('runs/ft: export', 'python -m jaxgpt.convert --workdir=runs/ft --export_hf=exported/ft', Run()),
        _evaluate('runs/sft'),
        # The page's own sample command for the SFT run (inline in docs/finetuning.md).
        Step('runs/sft: sample', "python -m jaxgpt.sample --workdir runs/sft --prompt "
                                 "$'<|user|>\\nName three colours.\\n<|assistant|>\\n' --stop '<|end|>'", Run()),
        *_serve_and_ask('runs/sft', '<|user|>\\nUpper-case the word.\\n\\nfox\\n<|assistant|>\\n'),
        _evaluate('runs/lora'),
        *_serve_and_ask('runs/lora', 'The quick'),
        # The preference-tuned chat model (docs/finetuning.md's DPO run on the SFT run): evaluated on text and
        # references (its held-out pairs are training's), sampled, served through chat completions, exported.
        Step('runs/dpo: evaluate', 'python -m jaxgpt.evaluate --workdir runs/dpo --text my_text.jsonl '
                                   '--references refs.jsonl --max_new_tokens 8', Run(expect=_references_scored)),
        Step('runs/dpo: sample', "python -m jaxgpt.sample --workdir runs/dpo --prompt "
                                 "$'<|user|>\\nUpper-case the word.\\n\\nowl\\n<|assistant|>\\n' --stop '<|end|>'", Run()),
        *_chat_and_ask('runs/dpo', 'Upper-case the word.'),
        Step('runs/dpo: export', 'python -m jaxgpt.convert --workdir=runs/dpo --export_hf=exported/dpo', Run()),
        # Moved from tests/test_lora.py: a LoRA checkpoint resumes only with the adapters' own rank.
        Step('resuming LoRA with another rank is refused',
             'python -m jaxgpt.train --config configs/lora.py:small --workdir runs/lora '
             '--config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl '
             + append({**FINETUNE_TINY, 'lora.rank': 4}),
             Run(exit_code=2, expect=_refused('lora_rank: checkpoint 8, config 4'))),
        # Moved from tests/test_finetune.py: a shape other than the base model's is refused, naming the field.
        Step('fine-tuning another shape is refused',
             'python -m jaxgpt.train --config configs/finetune_gpt2.py --workdir runs/bad '
             '--config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl '
             + append({**FINETUNE_TINY, 'model.embed_dim': 64}),
             Run(exit_code=2, expect=_refused('embed_dim: base 32, config 64'))),
    ],
    'data': [
        # configs/web_text.py's own command, on docs/data.md's prepared prose.
        Step('runs/web: train', 'python -m jaxgpt.train --config configs/web_text.py --config.data.path=~/crawl '
                                f'--workdir runs/web {append({**SIZES, **PROSE_DATA})}', Run(expect=_data_reused)),
        _evaluate('runs/web'),
        Step('runs/web: sample', 'python -m jaxgpt.sample --workdir runs/web --prompt "The "', Run()),
        *_serve_and_ask('runs/web', 'The '),
        _evaluate('runs/mixture'),
        Step('runs/mixture: sample', 'python -m jaxgpt.sample --workdir runs/mixture --prompt "The "', Run()),
        *_serve_and_ask('runs/mixture', 'The '),
    ],
    'llama_tiny': [
        Step('runs/llama_tiny: train',
             'python -m jaxgpt.train --config configs/llama_tiny.py --workdir runs/llama_tiny ' + append(LLAMA_TINY),
             Run()),
        _evaluate('runs/llama_tiny'),
        # Moved from tests/test_cli.py: several prompts, each continued.
        Step('runs/llama_tiny: sample', 'python -m jaxgpt.sample --workdir runs/llama_tiny --prompt "def main(" '
                                        '--prompt import --max_new_tokens 12 --temperature 0',
             Run(expect=_two_prompts_continued)),
        *_serve_and_ask('runs/llama_tiny', 'def '),
        Step('runs/llama_tiny: export',
             'python -m jaxgpt.convert --workdir=runs/llama_tiny --export_hf=exported/llama_tiny', Run()),
    ],
}

# Per config: its flow, and the names of its steps there (a doc command's: its page and text).
README = {key: doc_step('README.md', key) for key in (
    'python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart',
    'python -m jaxgpt.evaluate --workdir runs/tiny --references refs.jsonl --max_new_tokens 16',
    'python -m jaxgpt.sample --workdir runs/quickstart --prompt "def fibonacci(" --temperature 0.5',
    'python -m jaxgpt.serve --workdir runs/tiny --port 8765',
    'curl -s localhost:8765/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "import ", '
    '"max_tokens": 12, "temperature": 0.7, "seed": 1}\'')}
FINETUNING = {run: doc_step('docs/finetuning.md', key) for run, key in (
    ('runs/ft', 'python -m jaxgpt.train --config configs/finetune_gpt2.py:small --workdir runs/ft '
                '--config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl'),
    ('runs/sft', 'python -m jaxgpt.train --config configs/sft_alpaca.py:small --workdir runs/sft '
                 '--config.init_from=~/models/gpt2 --config.data.path=alpaca.jsonl'),
    ('sft export', 'python -m jaxgpt.convert --workdir=runs/sft --export_hf=~/models/gpt2-sft'),
    ('runs/lora', 'python -m jaxgpt.train --config configs/lora.py:small --workdir runs/lora '
                  '--config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl'),
    ('lora sample', 'python -m jaxgpt.sample --workdir runs/lora --prompt "The meaning of life is"'),
    ('runs/dpo', 'python -m jaxgpt.train --config configs/dpo.py:small --workdir runs/dpo --config.init_from=runs/sft '
                 '--config.data.path=prefs.jsonl'),
    ('lora export', 'python -m jaxgpt.convert --workdir=runs/lora --export_hf=~/models/gpt2-lora'))}


def _chain(flow: str, run: str) -> list[str]:
  return [s.name for s in CHAINS[flow] if s.label.startswith(f'{run}: ')]


CONFIGS = {
    'quickstart': ('quickstart', list(README.values())),
    'llama_tiny': ('llama_tiny', _chain('llama_tiny', 'runs/llama_tiny')),
    'finetune_gpt2': ('finetuning', [FINETUNING['runs/ft'], *_chain('finetuning', 'runs/ft')]),
    'sft_alpaca': ('finetuning', [FINETUNING['runs/sft'], *_chain('finetuning', 'runs/sft'), FINETUNING['sft export']]),
    'lora': ('finetuning', [FINETUNING['runs/lora'], FINETUNING['lora sample'], *_chain('finetuning', 'runs/lora'),
                            FINETUNING['lora export']]),
    'dpo': ('finetuning', [FINETUNING['runs/dpo'], *_chain('finetuning', 'runs/dpo')]),
    'web_text': ('data', [doc_step('docs/data.md', 'python -m jaxgpt.prepare --config configs/web_text.py '
                                                   '--config.data.path=~/crawl'), *_chain('data', 'runs/web')]),
    'mixture': ('data', [doc_step('docs/data.md', 'python -m jaxgpt.train --config configs/mixture.py --workdir '
                                                  'runs/mixture'), *_chain('data', 'runs/mixture')]),
}


def test_every_config_a_cpu_runs_is_here():
  for_clusters = {'gpt2', 'llama_1b'}  # trained tiny by tests/test_docs.py (docs/gpu.md, docs/tpu.md)
  # Trained and evaluated by docs/recipes.md's commands; sampled, served and exported as sft_alpaca and
  # finetune_gpt2 are, whose settings they take.
  recipes = {'chat', 'content', 'codegen', 'summarization', 'qa', 'sentiment'}
  assert {f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py')} == {
      *CONFIGS, *for_clusters, *recipes}


@pytest.mark.parametrize('config', CONFIGS)
def test_config_trains_evaluates_samples_serves_and_exports(config, command_runs):
  flow_name, names = CONFIGS[config]
  flow = command_runs.flow(flow_name)
  by_name = {s.name: s for s in flow.steps}
  failures = [f for f in (check_step(flow, by_name[name]) for name in names) if f]
  assert not failures, f'{len(failures)} of {len(names)} steps failed:\n\n' + '\n\n'.join(failures)
  ran = ' '.join(by_name[name].text for name in names)
  assert all(f'-m jaxgpt.{command} ' in ran for command in ('train', 'evaluate', 'sample', 'serve'))


@pytest.mark.parametrize('label', ['resuming with other data settings is refused',
                                   'fine-tuning another shape is refused',
                                   'resuming LoRA with another rank is refused'])
def test_a_run_refuses_what_it_was_not_made_for(label, command_runs):
  flow = command_runs.flow(next(name for name, steps in CHAINS.items() if any(s.label == label for s in steps)))
  failure = check_step(flow, next(s for s in flow.steps if s.label == label))
  assert not failure, failure


@pytest.mark.parametrize('config', EXPORTS)
def test_export_loads_in_transformers_with_the_logits_of_the_run(config, command_runs):
  """Moved from tests/test_finetune.py, for every exported run: Hugging Face computes what jaxgpt computes."""
  import jax.numpy as jnp
  import torch
  import transformers
  from jaxgpt import inference, run_dir
  flow_name, run, exported = EXPORTS[config]
  flow = command_runs.flow(flow_name)
  with home_as(flow.home):  # a LoRA run reads its base model from ~/models/gpt2
    run, exported = os.path.join(flow.directory, run), os.path.join(flow.directory, os.path.expanduser(exported))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    run_config, tokenizer = run_dir.load_run(run)
    loaded = inference.load(run_config, tokenizer, run)
    jax_model, params = loaded.model, loaded.params
  assert type(model).__name__ == ('LlamaForCausalLM' if config == 'llama_tiny' else 'GPT2LMHeadModel')
  ids = [tokenizer.encode('the lazy dog jumps')]
  assert transformers.AutoTokenizer.from_pretrained(exported)('the lazy dog jumps')['input_ids'] == ids[0]
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(jax_model.apply({'params': params}, jnp.array(ids))), atol=1e-4)


def test_lora_checkpoint_holds_trained_adapters_only_and_export_merges_them(command_runs):
  """Moved from tests/test_lora.py, on docs/finetuning.md's LoRA run: what its checkpoint holds, and what
  its export adds to the base model."""
  import torch
  import transformers
  from jaxgpt import run_dir, state
  from jaxgpt.checkpoint import Checkpointer
  from jaxgpt.model import build_model
  from jaxgpt.optim import make_optimizer
  from jaxgpt.sharding import make_mesh
  flow = command_runs.flow('finetuning')
  assert not check_step(flow, next(s for s in flow.steps if s.name == FINETUNING['lora export']))
  run = os.path.join(flow.directory, 'runs/lora')
  config, tokenizer = run_dir.load_run(run)
  mesh = make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  abstract = state.abstract_state(build_model(config, tokenizer.vocab_size),
                                  make_optimizer(config.optim, config.train.num_steps), config.seq_len, mesh,
                                  lora_cfg=config.lora)
  with Checkpointer(run) as checkpoints:
    adapters = checkpoints.restore(checkpoints.latest_step(), abstract).params
  assert {k for layer in adapters.values() for k in layer} == {'query', 'key', 'value', 'out'}
  assert {k for layer in adapters.values() for adapter in layer.values() for k in adapter} == {'lora_a', 'lora_b'}
  assert float(np.abs(adapters['blocks']['query']['lora_b']).max()) > 0  # training moved the adapters (from zero)
  ids = torch.tensor([tokenizer.encode('the lazy dog jumps')])
  with torch.no_grad():
    exported, base = (transformers.AutoModelForCausalLM.from_pretrained(os.path.join(flow.home, d)).eval()(ids)
                      .logits.numpy() for d in ('models/gpt2-lora', 'models/gpt2'))
  assert np.abs(exported - base).max() > 1e-5  # the export is the base with the adapters merged, not the base
