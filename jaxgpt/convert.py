"""Hugging Face checkpoints in and out of jaxgpt run directories.

  python -m jaxgpt.convert --import_hf=~/gpt2 --workdir=runs/gpt2          # HF directory -> jaxgpt run
  python -m jaxgpt.convert --workdir=runs/sft --export_hf=~/gpt2-sft       # jaxgpt run -> HF directory
  ... --export_hf=~/gpt2-sft --push_to_hub=me/gpt2-sft                     # and up to the Hugging Face Hub

An imported run directory is what training writes (config, tokenizer, a step-0
checkpoint), so `jaxgpt.sample` reads it and `--config.init_from` starts from
it. Export writes what `transformers` loads with AutoModelForCausalLM and
AutoTokenizer, for every run: weights (a LoRA run's adapters merged into the
base), config.json, the tokenizer (jaxgpt/hub.py: tokenizer.json whatever the
kind, the chat template of an instruction-tuned run), generation_config.json and
a model card (jaxgpt/model_card.py).
"""

import json

import safetensors.numpy
from absl import flags

from jaxgpt import hf, hub, inference, model_card, paths, run_dir, state as state_lib
from jaxgpt.config import JaxgptError, base_config, run_cli


def import_hf(directory: str, workdir: str) -> str:
  """Writes a jaxgpt run directory (config, tokenizer, step-0 checkpoint) from a HF directory."""
  fields, tokenizer, params = hf.load_hf(directory)
  config = base_config()
  config.model.update(fields)
  config.seq_len = min(config.seq_len, config.model.max_len)
  bos = tokenizer.bos_token if tokenizer.bos_token != tokenizer.eos_token else ''
  config.data.tokenizer.update(kind='byte_bpe', eos_token=tokenizer.eos_token, bos_token=bos,
                               path=hf.tokenizer_path(str(paths.path(directory))))
  state_lib.save_initial_run(config, tokenizer, params, workdir)
  return workdir


def export_hf(workdir: str, directory: str, step: int | None = None, license: str = 'unknown') -> str:
  """Writes a HF directory from a jaxgpt run's checkpoint: model.safetensors, config.json, the tokenizer
  files, generation_config.json and README.md (the model card, under `license`)."""
  config, tokenizer = run_dir.load_run(workdir)
  kind = hf.architecture(config.model)
  files = hub.tokenizer_files(tokenizer, config)  # before the weights: a tokenizer without a HF form fails early
  loaded = inference.load(config, tokenizer, workdir, step, dtype='float32')  # exported as trained
  tensors = hf.params_to_hf(loaded.params, kind)
  directory = paths.expand(directory)
  out = paths.path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / hf.HF_WEIGHTS).write_bytes(safetensors.numpy.save(tensors, metadata={'format': 'pt'}))
  files[hf.HF_CONFIG] = json.dumps(hf.hf_config(config.model, tokenizer.vocab_size, tokenizer.eos_id,
                                                tokenizer.bos_id), indent=2)
  files[hub.GENERATION_CONFIG] = json.dumps(hub.generation_config(tokenizer, config), indent=2)
  files['README.md'] = model_card.model_card(workdir, config, tokenizer, kind, sum(t.size for t in tensors.values()),
                                             loaded.step, license)
  for name, text in files.items():
    (out / name).write_text(text)
  return directory


# --- command line --------------------------------------------------------------------------------

def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir or bool(FLAGS.import_hf) == bool(FLAGS.export_hf):
    raise JaxgptError('give --workdir and exactly one of --import_hf=HF_DIR (HF -> jaxgpt run in --workdir) '
                      'or --export_hf=HF_DIR (the run in --workdir -> HF).')
  if FLAGS.push_to_hub and not FLAGS.export_hf:
    raise JaxgptError('--push_to_hub uploads an export: give --export_hf=DIR too (the folder uploaded).')
  token = hub.check_push(FLAGS.push_to_hub, FLAGS.export_hf) if FLAGS.push_to_hub else None  # before any work
  if FLAGS.import_hf:
    print(f'imported {FLAGS.import_hf} into {import_hf(FLAGS.import_hf, FLAGS.workdir)}')
    return
  directory = export_hf(FLAGS.workdir, FLAGS.export_hf, FLAGS.step, FLAGS.license)
  print(f'exported {FLAGS.workdir} to {directory}')
  if token:
    url = hub.push(directory, FLAGS.push_to_hub, token, FLAGS.private,
                   f'jaxgpt export of {paths.path(FLAGS.workdir).name}')
    print(f'pushed {directory} to {url}')


def cli():
  flags.DEFINE_string('workdir', None, 'The jaxgpt run directory: written by --import_hf, read by --export_hf.')
  flags.DEFINE_string('import_hf', None, 'A Hugging Face model directory to import.')
  flags.DEFINE_string('export_hf', None, 'The Hugging Face directory to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
  flags.DEFINE_string('license', 'unknown', "The model card's license, as the Hub names it (e.g. apache-2.0, mit).")
  flags.DEFINE_string('push_to_hub', None, 'Also upload the export to this Hugging Face Hub repository '
                      '(OWNER/NAME, created if new), with the token in HF_TOKEN or from `hf auth login`.')
  flags.DEFINE_boolean('private', False, 'With --push_to_hub: create the repository private.')
  run_cli(main)


if __name__ == '__main__':
  cli()
