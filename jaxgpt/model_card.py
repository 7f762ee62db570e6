"""The model card of an exported run: README.md with the Hub's metadata header, filled from the run's files.

Each figure comes from where the run left it: the architecture and the data and training settings from its
config.json, the final validation from results.json, later evaluations from eval/step_N/results.json
(jaxgpt.evaluate), and what cleaning dropped and why from the data cache's report.json, found where
training found it (data.cache_dir and the fingerprint of the data settings). What is missing is said to be
missing, never guessed.
"""

import json

from jaxgpt import paths
from jaxgpt.config import JaxgptError, mixture_parts
from jaxgpt.data import builder, sources
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.model import build_model, flops_per_token

RESULTS_FILE = 'results.json'  # what jaxgpt.train and jaxgpt.evaluate write
_HF_DATASETS = 'hf://datasets/'
_TRAINING_FIGURES = ('step', 'train_seconds', 'seconds_per_step', 'epochs')  # in results.json, not evaluations


def model_card(workdir: str, config, tokenizer: Tokenizer, architecture: str, num_params: int, step: int,
               license: str = 'unknown') -> str:
  """README.md for the export of `workdir`'s checkpoint `step`: a `num_params`-parameter `architecture`
  (the transformers model type) model."""
  results = _read_json(paths.path(workdir) / RESULTS_FILE)
  untrained = ['## Training', '', 'This is step 0 of the run (an imported model, or one not trained yet): '
               'jaxgpt did not train it, so its training data and figures are not stated here.', '']
  return '\n'.join([
      _metadata(config, architecture, license),
      f'# {paths.path(workdir).name}', '',
      f'A {_millions(num_params)}-parameter {architecture} language model {_origin(config, step)} with jaxgpt '
      '(JAX/Flax), exported to transformers. Every figure below comes from the run\'s own files.', '',
      *_model_section(config, tokenizer, architecture, num_params, step),
      *(_data_section(config, tokenizer) + _training_section(config, tokenizer, results) if step else untrained),
      *_evaluation_section(workdir, results if step else None),
      *_use_sections(config),
  ])


def _metadata(config, architecture: str, license: str) -> str:
  """The YAML header the Hub reads (values as JSON, which YAML reads as they are)."""
  datasets = sorted({_hf_dataset(p) for part in _sources(config).values() for p in part.path.split(',')} - {''})
  fields = {'license': license, 'library_name': 'transformers', 'pipeline_tag': 'text-generation',
            'tags': ['jaxgpt', 'jax', architecture, 'text-generation'] + (['lora'] if config.lora.rank else []),
            **({'datasets': datasets} if datasets else {})}
  return '\n'.join(['---', *(f'{k}: {json.dumps(v)}' for k, v in fields.items()), '---', ''])


def _hf_dataset(path: str) -> str:
  """'owner/name' of a hf://datasets/owner/name/... path; '' for any other."""
  path = path.strip()
  return '/'.join(path[len(_HF_DATASETS):].split('/')[:2]) if path.startswith(_HF_DATASETS) else ''


def _origin(config, step: int) -> str:
  if not step:
    return 'converted'
  if not config.init_from:
    return 'trained from scratch'
  how = f'with LoRA adapters (rank {config.lora.rank}, merged into the weights)' if config.lora.rank else ''
  return f'fine-tuned from `{config.init_from}` {how}'.rstrip()


def _model_section(config, tokenizer: Tokenizer, architecture: str, num_params: int, step: int) -> list[str]:
  m = config.model
  heads = f'{m.num_heads} attention heads' + (f' ({m.num_kv_heads} key/value heads)' if m.num_kv_heads else '')
  positions = f'rotary (RoPE, theta {m.rope_theta:g})' if m.position == 'rope' else 'learned'
  rows = [('Architecture', f'{architecture} ({m.norm}, {m.mlp} MLP, {positions} positions)'),
          ('Parameters', f'{num_params:,}'),
          ('Layers x width', f'{m.num_layers} x {m.embed_dim}, {heads}, MLP width {m.mlp_dim}'),
          ('Context', f'{m.max_len} tokens'),
          ('Tokenizer', f'{_tokenizer(config, tokenizer)}, {tokenizer.vocab_size:,} tokens; '
                        f'BOS `{tokenizer.bos_token}`, EOS `{tokenizer.eos_token}`'),
          ('Checkpoint', f'step {step:,} of {config.train.num_steps:,}')]
  return ['## Model', '', *_table(('', ''), rows), '']


def _tokenizer(config, tokenizer: Tokenizer) -> str:
  tok_cfg = config.data.tokenizer
  kind = {'sentencepiece': 'SentencePiece', 'byte_bpe': 'Hugging Face tokenizer.json', 'tiktoken': 'tiktoken'}
  if config.init_from:
    return f"the base model's {kind[tokenizer.kind]}"
  if tok_cfg.path:
    return f'{kind[tokenizer.kind]} from `{tok_cfg.path}`'
  return f'SentencePiece ({tok_cfg.model_type}), trained on the training split'


def _sources(config) -> dict:
  """name -> data config of each source: a mixture's, or the one source ('')."""
  return {name: part for name, (_, part) in mixture_parts(config.data).items()} or {'': config.data}


def _data_section(config, tokenizer: Tokenizer) -> list[str]:
  lines = ['## Training data', '']
  weights = {name: weight for name, (weight, _) in mixture_parts(config.data).items()}
  total = sum(weights.values())
  for name, part in _sources(config).items():
    where = part.tfds_name if part.source == 'tfds' else part.path or 'the Python standard library\'s source'
    if name:
      lines += [f'### {name} ({weights[name] / total:.0%} of the tokens trained on)', '']
    lines += [f'Source: `{part.source}`, {where}; format `{part.format}`.', '']
    report = _data_report(part, tokenizer)
    lines += _cleaning_report(report) if report else [
        f'The data cache\'s report (report.json, under {part.cache_dir}) was not found where training left it, '
        'so what cleaning kept and dropped is not stated here.', '']
  return lines


def _data_report(data_cfg, tokenizer: Tokenizer) -> dict | None:
  """The report.json of the cache this source was prepared into, or None when it is gone."""
  reports = {}  # the caches of this kind of source tokenized by this tokenizer: none, for most runs exported elsewhere
  for path in paths.path(data_cfg.cache_dir).glob(f'{data_cfg.source}-*/{builder.REPORT_FILE}'):
    report = _read_json(path)
    if report.get('tokenizer', {}).get('fingerprint') == tokenizer.fingerprint:
      reports[path.parent.name] = report
  if not reports:
    return None
  try:
    source = sources.open_source(data_cfg)  # (reads the file list: the fingerprint holds each file's size and time)
  except (JaxgptError, OSError):  # the source is not on this machine
    return None
  # The tokenizer was made from the data, or given to it (a base model's, a mixture's).
  names = [builder.cache_directory(data_cfg, given, source).name for given in (None, tokenizer)]
  return next((reports[name] for name in names if name in reports), None)


def _cleaning_report(report: dict) -> list[str]:
  read, kept = report['read'], report['kept']
  lines = [f'Cleaning (the data cache\'s report.json) read {read["documents"]:,} documents ({_mb(read["bytes"])}) '
           f'and kept {kept["documents"]:,} ({_mb(kept["bytes"])}).', '']
  for section, verb in (('dropped', 'Dropped'), ('changed', 'Changed (kept)'), ('flagged', 'Flagged (kept)')):
    if report[section]:
      rows = [(reason, f'{entry["count"]:,}', (entry['examples'] or [''])[0])
              for reason, entry in report[section].items()]
      lines += [f'{verb}, by reason:', '', *_table(('reason', 'documents', 'for example'), rows), '']
  splits = [(split, f'{report[split]["documents"]:,}', _mb(report[split]['bytes']), f'{report[split]["tokens"]:,}')
            for split in ('train', 'validation') if split in report]
  return lines + _table(('split', 'documents', 'text', 'tokens'), splits) + ['']


def _training_section(config, tokenizer: Tokenizer, results: dict | None) -> list[str]:
  o = config.optim
  lines = ['## Training', '']
  if results is None:
    return lines + ['The run directory has no results.json: training did not finish.', '']
  steps = results.get('step', config.train.num_steps)
  rows = config.batch_size * (2 if config.train.get('objective') == 'dpo' else 1)  # DPO: a chosen and a rejected row
  tokens = steps * rows * config.seq_len
  flops = flops_per_token(build_model(config, tokenizer.vocab_size).cfg, config.seq_len) * tokens
  lines += [f'- {steps:,} steps of {rows} sequences x {config.seq_len} tokens: {tokens:,} tokens '
            f'({flops:.3g} training FLOPs, at 6 per weight per token plus attention).',
            f'- AdamW, learning rate {o.lr:g} (warmup {o.warmup_steps} steps, cosine decay to {o.min_lr_ratio:g}x), '
            f'weight decay {o.weight_decay:g}, gradients clipped at {o.grad_clip:g}.']
  if 'train_seconds' in results:
    lines.append(f'- {results["train_seconds"]:,.0f} seconds of training'
                 + (f', {results["seconds_per_step"]:.3f} s per step' if 'seconds_per_step' in results else '') + '.')
  return lines + ['']


def _evaluation_section(workdir: str, results: dict | None) -> list[str]:
  lines = ['## Evaluation', '']
  if results:
    figures = [(name, _number(v)) for name, v in _figures(results) if name not in _TRAINING_FIGURES]
    lines += ['At the end of training, on the held-out split (results.json):', '',
              *_table(('figure', 'value'), figures), '']
  evaluations = sorted(paths.path(workdir).glob(f'eval/step_*/{RESULTS_FILE}'), key=lambda p: p.parent.name)
  for path in evaluations:
    evaluated = _read_json(path)
    lines += [f'`jaxgpt.evaluate` at step {path.parent.name.removeprefix("step_")}, on the '
              f'{evaluated.get("text", "held-out split")}:', '',
              *_table(('figure', 'value'), [(n, _number(v)) for n, v in _figures(evaluated) if n != 'step']), '']
  if not results and not evaluations:
    lines += ['The run directory holds no evaluation figures.', '']
  return lines


def _figures(results: dict, prefix: str = ''):
  """(dotted name, number) of every number in results, nested ones included."""
  for name, value in results.items():
    if isinstance(value, dict):
      yield from _figures(value, f'{prefix}{name}.')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield prefix + name, value


def _use_sections(config) -> list[str]:
  chat = config.data.format != 'text'
  return [
      '## Intended use', '',
      'Research and experimentation: '
      + ('answering prompts in the chat template it was tuned with (tokenizer_config.json\'s `chat_template`; '
         '`apply_chat_template` renders it).' if chat else 'continuing text like its training data.'),
      'It is not meant for decisions about people, or for any use where a wrong or harmful text does damage.', '',
      '## Limitations', '',
      '- A model of this size and training gets facts wrong, repeats itself and drifts from the prompt; it knows '
      'nothing beyond its training data.',
      '- Its outputs can reproduce biases and offensive or private text in that data; they were not checked for '
      'safety. Filter them before people see them (jaxgpt.serve can flag profanity and personal data).',
      f'- It reads at most {config.model.max_len} tokens of context.', '',
      '## Machine-generated text', '',
      'Text this model produces is machine-generated. Say so wherever people may read it, and do not present it '
      'as written by a person.', '',
      '## How to use', '',
      '```python',
      'from transformers import AutoModelForCausalLM, AutoTokenizer',
      "model = AutoModelForCausalLM.from_pretrained('PATH_OR_REPO')",
      "tokenizer = AutoTokenizer.from_pretrained('PATH_OR_REPO')",
      ("inputs = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hello!'}], add_generation_prompt=True, "
       "return_tensors='pt', return_dict=True)" if chat else "inputs = tokenizer('def main(', return_tensors='pt')"),
      'print(tokenizer.decode(model.generate(**inputs)[0]))',
      '```', '']


def _table(header: tuple, rows) -> list[str]:
  cell = lambda value: str(value).replace('|', '\\|').replace('\n', ' ')
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *('| ' + ' | '.join(map(cell, row)) + ' |' for row in rows)]


def _read_json(path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def _number(value) -> str:
  return f'{value:,}' if isinstance(value, int) else f'{value:.4f}'


def _millions(n: int) -> str:
  return f'{n / 1e6:.1f}M' if n >= 1e6 else f'{n / 1e3:.0f}K'


def _mb(n: int) -> str:
  return f'{n / 1e6:.2f} MB'
