"""Sweep at a fixed training time: which variant of a config trains best in N minutes here?

  python tools/sweep.py --config configs/quickstart.py --minutes 5 --workdir runs/sweep \
      --variant 'gpt2-256:model.embed_dim=256,model.mlp_dim=1024,model.position=learned,model.norm=layernorm,model.mlp=gelu,model.use_bias=True,optim.lr=3e-3' \
      --variant 'quickstart:' --variant 'lr-1e-2:optim.lr=1e-2'

A variant is a name, a colon, and comma-separated overrides of --config; `--config.a.b=value`
flags given to the sweep itself apply to every variant. For each variant, one after another
(time budgets mean nothing on a shared machine):
  1. a 30-step run of the same command times its step (the real loop, data and all);
  2. train.num_steps is set so that training takes about --minutes at that speed;
  3. `python -m jaxgpt.train` trains it in WORKDIR/NAME (its last validation reads the whole
     held-out split).
Then it prints, per variant: parameters, step time, steps, the training time the run itself
reports, and bits per byte on the held-out split. docs/performance.md shows one such sweep.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_STEPS = 30  # timed to size each run; the first, compiling step is not counted


def _run(args: list[str]) -> str:
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f'error: {" ".join(args[:2])} failed:\n{result.stderr[-3000:]}')
  return result.stdout


def seconds_per_step(config_args: list[str], workdir: str) -> float:
  """The variant's real step time: a short run of the same command, the same loop and data."""
  _run(['-m', 'jaxgpt.train', *config_args, '--workdir', workdir, f'--config.train.num_steps={PROBE_STEPS}',
        '--config.train.final_eval_whole_split=False', '--config.train.eval_batches=1',
        '--config.sample.prompts=()'])
  seconds = json.load(open(os.path.join(workdir, 'results.json')))['seconds_per_step']
  shutil.rmtree(workdir)
  return seconds


def sweep_variant(args, name: str, config_args: list[str]) -> dict:
  workdir = os.path.join(os.path.abspath(args.workdir), name)
  step_seconds = seconds_per_step(config_args, workdir + '-probe')
  steps = max(PROBE_STEPS, int(args.minutes * 60 / step_seconds))
  out = _run(['-m', 'jaxgpt.train', *config_args, f'--config.train.num_steps={steps}', '--workdir', workdir])
  results = json.load(open(os.path.join(workdir, 'results.json')))
  params = re.search(r'model: ([\d.]+)M parameters', out).group(1)
  return {'variant': name, 'params_M': float(params), 'seconds_per_step': step_seconds, 'steps': steps,
          'train_seconds': results['train_seconds'], 'bits_per_byte': results['bits_per_byte']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='the config file every variant starts from')
  parser.add_argument('--variant', action='append', required=True,
                      help="NAME:a.b=value,c.d=value (overrides of --config; 'NAME:' for none); repeat it")
  parser.add_argument('--minutes', type=float, default=5.0, help='training time per variant')
  parser.add_argument('--workdir', required=True, help='one run directory per variant is made under it')
  # --config.a.b=value flags are not this tool's: they pass through to every variant's commands.
  args, common = parser.parse_known_args()
  if any(not arg.startswith('--config.') for arg in common):
    parser.error(f'unknown arguments: {" ".join(a for a in common if not a.startswith("--config."))}')
  rows = []
  for spec in args.variant:
    name, _, overrides = spec.partition(':')
    config_args = ['--config', args.config, *common, *(f'--config.{o}' for o in overrides.split(',') if o)]
    rows.append(sweep_variant(args, name, config_args))
    print(json.dumps(rows[-1]), flush=True)
  print(f'\n{"variant":<20} {"params":>8} {"step ms":>8} {"steps":>6} {"trained":>8} {"bits/byte":>9}')
  for r in rows:
    print(f'{r["variant"]:<20} {r["params_M"]:>7.2f}M {1000 * r["seconds_per_step"]:>8.1f} {r["steps"]:>6} '
          f'{r["train_seconds"]:>7.0f}s {r["bits_per_byte"]:>9.3f}')


if __name__ == '__main__':
  main()
