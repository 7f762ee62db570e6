"""Hugging Face checkpoints in and out of jaxgpt run directories.

  python -m jaxgpt.convert --import_hf=~/gpt2 --workdir=runs/gpt2          # HF directory -> jaxgpt run
  python -m jaxgpt.convert --workdir=runs/sft --export_hf=~/gpt2-sft       # jaxgpt run -> HF directory

An imported run directory is what training writes (config, tokenizer, a step-0
checkpoint), so `jaxgpt.sample` reads it and `--config.init_from` starts from
it. Export writes what `transformers`' `from_pretrained` loads, tokenizer
included; a LoRA run is exported with its adapters merged into the base.
"""

import json

import safetensors.numpy
from absl import flags

from jaxgpt import hf, inference, paths, run_dir, state as state_lib
from jaxgpt.config import JaxgptError, base_config, run_cli


def import_hf(directory: str, workdir: str) -> str:
  """Writes a jaxgpt run directory (config, tokenizer, step-0 checkpoint) from a HF directory."""
  fields, tokenizer, params = hf.load_hf(directory)
  config = base_config()
  config.model.update(fields)
  config.seq_len = min(config.seq_len, config.model.max_len)
  config.data.tokenizer.update(kind='byte_bpe', eos_token=tokenizer.eos_token,
                               path=hf.tokenizer_path(str(paths.path(directory))))
  state_lib.save_initial_run(config, tokenizer, params, workdir)
  return workdir


def export_hf(workdir: str, directory: str, step: int | None = None) -> str:
  """Writes a HF directory (config, model.safetensors, tokenizer) from a jaxgpt run's checkpoint."""
  config, tokenizer = run_dir.load_run(workdir)
  kind = hf.architecture(config.model)
  if tokenizer.kind != 'byte_bpe':
    raise JaxgptError(f'{workdir} uses a {tokenizer.kind} tokenizer; Hugging Face export needs the byte-level '
                      'BPE tokenizer of a base model (train with --config.init_from, or data.tokenizer.kind=byte_bpe).')
  params = inference.load(config, tokenizer, workdir, step, dtype='float32').params  # exported as trained
  directory = paths.expand(directory)
  out = paths.path(directory)
  out.mkdir(parents=True, exist_ok=True)
  weights = safetensors.numpy.save(hf.params_to_hf(params, kind), metadata={'format': 'pt'})
  (out / hf.HF_WEIGHTS).write_bytes(weights)
  (out / hf.HF_CONFIG).write_text(json.dumps(hf.hf_config(config.model, tokenizer.vocab_size, tokenizer.eos_id),
                                             indent=2))
  (out / 'tokenizer.json').write_text(tokenizer.tokenizer_json)
  eos = tokenizer.eos_token
  (out / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': eos, 'eos_token': eos, 'unk_token': eos,
       'model_max_length': config.model.max_len}, indent=2))
  return directory


# --- command line --------------------------------------------------------------------------------

def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir or bool(FLAGS.import_hf) == bool(FLAGS.export_hf):
    raise JaxgptError('give --workdir and exactly one of --import_hf=HF_DIR (HF -> jaxgpt run in --workdir) '
                      'or --export_hf=HF_DIR (the run in --workdir -> HF).')
  if FLAGS.import_hf:
    print(f'imported {FLAGS.import_hf} into {import_hf(FLAGS.import_hf, FLAGS.workdir)}')
  else:
    print(f'exported {FLAGS.workdir} to {export_hf(FLAGS.workdir, FLAGS.export_hf, FLAGS.step)}')


def cli():
  flags.DEFINE_string('workdir', None, 'The jaxgpt run directory: written by --import_hf, read by --export_hf.')
  flags.DEFINE_string('import_hf', None, 'A Hugging Face model directory to import.')
  flags.DEFINE_string('export_hf', None, 'The Hugging Face directory to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
  run_cli(main)


if __name__ == '__main__':
  cli()
