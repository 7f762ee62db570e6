"""Sweep a config: a grid or a random search over any of its fields, each variant trained in its own process.

  python tools/sweep.py --config configs/quickstart.py --workdir runs/grid \
      --sweep model.embed_dim=96,128 --sweep optim.lr=log:1e-3:1e-2:3 --parallel 2
  python tools/sweep.py --config configs/quickstart.py --workdir runs/random \
      --sweep optim.lr=log:1e-4:1e-2 --sweep optim.warmup_steps=10,30,100 --random 8 --seed 0
  python tools/sweep.py --config configs/quickstart.py --minutes 5 --workdir runs/sweep \
      --variant 'quickstart:' --variant 'lr-1e-2:optim.lr=1e-2'

The values of `--sweep FIELD=VALUES` (FIELD a dotted field of --config):
  a,b,c            these values
  lin:LO:HI:N      N evenly spaced values from LO to HI
  log:LO:HI:N      N values evenly spaced in log scale from LO to HI
  lin:LO:HI, log:LO:HI   with --random: the whole range, drawn uniformly (in log scale for log)
An integer field gets integers (rounded). Every combination of the --sweep fields is a variant (a grid);
with `--random N`, N combinations drawn with --seed instead (distinct when every field is a list of
values). `--variant NAME:a.b=v,c.d=w` adds a named variant. Grid and random variants are named by their
values (`embed_dim=96,lr=0.001`). `--config.a.b=value` flags given to the sweep apply to every variant.

Each variant is `python -m jaxgpt.train` in WORKDIR/NAME, its output appended to WORKDIR/NAME/train.log;
--parallel K of them run at once (default 1, one run per machine; give each its own GPUs with
--gpus_per_variant). With --minutes, a 30-step run of the same command first times the variant's step
and train.num_steps is set so that training takes about that long (timings mean little on a shared
machine, so then one variant runs at a time unless each has its own GPUs).

An interrupted sweep resumes when run again: a variant whose run has results.json is done and is not
run again; one stopped part-way resumes from its last checkpoint (as jaxgpt.train does), with the steps
it was given. A variant that fails is reported and the others go on.

Prints one JSON line per variant as it ends, then a table; WORKDIR/sweep.csv has one row per variant,
its swept values and final figures, rewritten as variants end. docs/experiments.md shows sweeps;
docs/performance.md one at a fixed time.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_STEPS = 30  # timed to size each run with --minutes; the first, compiling step is not counted
PLAN_FILE = 'sweep_plan.json'  # in a variant's run directory: the steps --minutes gave it, and the step time
NO_EPOCHS = ('--config.train.num_epochs=0',)  # --minutes sets the steps: train.num_epochs must not
# Each row's final figures, after the variant's name and values (`results.json` and the run's log).
FIGURES = ('params_M', 'steps', 'seconds_per_step', 'train_seconds', 'loss', 'perplexity', 'bits_per_byte',
           'best_step', 'stopped_early', 'error')


@dataclasses.dataclass(frozen=True)
class Range:
  """A field's whole range, drawn from by a random search."""
  low: float
  high: float
  log: bool

  def draw(self, rng: random.Random) -> float:
    if self.log:
      return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    return rng.uniform(self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: tuple  # ((field, value as the command line gives it), ...)


def _number(text: str, spec: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f'{text!r} in {spec!r} is not a number') from None


def _format(value, integer: bool) -> str:
  return str(round(value)) if integer else f'{value:.4g}'


def parse_values(spec: str, integer: bool, random_search: bool):
  """The values of one --sweep (strings, as a command line gives them), or a Range for a random search."""
  kind, _, rest = spec.partition(':')
  if kind not in ('lin', 'log'):
    values = [v.strip() for v in spec.split(',')]
    if not all(values):
      raise ValueError(f'{spec!r} has an empty value: give values separated by commas, e.g. 1e-3,3e-3')
    return values
  parts = rest.split(':')
  if len(parts) not in (2, 3):
    raise ValueError(f'{spec!r} is not {kind}:LO:HI:N (or {kind}:LO:HI with --random)')
  low, high = (_number(p, spec) for p in parts[:2])
  if kind == 'log' and (low <= 0 or high <= 0):
    raise ValueError(f'{spec!r}: a log range needs positive ends')
  if len(parts) == 2:
    if not random_search:
      raise ValueError(f'{spec!r} has no count: a grid needs {kind}:LO:HI:N (a range without N is for --random)')
    return Range(low, high, kind == 'log')
  count = _number(parts[2], spec)
  if count != int(count) or count < 1:
    raise ValueError(f'{spec!r}: N={parts[2]} must be a whole number of values, 1 or more')
  count = int(count)
  fractions = [i / (count - 1) if count > 1 else 0.0 for i in range(count)]
  if kind == 'log':
    numbers = [math.exp(math.log(low) + f * (math.log(high) - math.log(low))) for f in fractions]
  else:
    numbers = [low + f * (high - low) for f in fractions]
  values = [_format(x, integer) for x in numbers]
  if len(set(values)) < len(values):
    raise ValueError(f'{spec!r} gives the same value twice ({", ".join(values)}): fewer values, or a wider range')
  return values


def _short_names(fields: list[str]) -> dict[str, str]:
  """Each field's last part (`optim.lr` -> `lr`), or all of it where two fields end the same way."""
  last = [f.rsplit('.', 1)[-1] for f in fields]
  return {f: (short if last.count(short) == 1 else f) for f, short in zip(fields, last)}


def _name(values: list[tuple[str, str]], short: dict[str, str]) -> str:
  return ','.join(f'{short[field]}={value}' for field, value in values).replace('/', '_')


def grid_variants(sweeps: list[tuple[str, object]], integer_fields: set, random_count: int = 0,
                  seed: int = 0) -> list[Variant]:
  """The variants of the --sweep fields: every combination, or `random_count` drawn with `seed`."""
  fields = [field for field, _ in sweeps]
  short = _short_names(fields)
  choices = [values for _, values in sweeps]
  rng = random.Random(seed)
  if not random_count:
    combinations = list(itertools.product(*choices))
  elif all(isinstance(c, list) for c in choices):
    grid = list(itertools.product(*choices))
    if random_count > len(grid):
      raise ValueError(f'--random {random_count} asks for more variants than the {len(grid)} combinations there '
                       'are: lower it, leave --random out to run them all, or give ranges (log:LO:HI)')
    combinations = rng.sample(grid, random_count)
  else:
    combinations = [tuple(rng.choice(c) if isinstance(c, list) else _format(c.draw(rng), f in integer_fields)
                          for f, c in zip(fields, choices)) for _ in range(random_count)]
  variants, seen = [], set()
  for combination in combinations:
    values = list(zip(fields, combination))
    name = _name(values, short)
    while name in seen:  # a random search may draw a combination twice
      name += '+'
    seen.add(name)
    variants.append(Variant(name, tuple(values)))
  return variants


def named_variant(spec: str) -> Variant:
  name, _, overrides = spec.partition(':')
  pairs = [o.split('=', 1) for o in overrides.split(',') if o]
  if not name or any(len(p) != 2 for p in pairs):
    raise ValueError(f"--variant {spec!r} is not NAME:a.b=value,c.d=value (or 'NAME:' for none)")
  return Variant(name, tuple((field, value) for field, value in pairs))


def load_config(spec: str):
  """The config file's config (`file.py` or `file.py:arg`), for checking the swept fields."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist')
  sys.path.insert(0, REPO)
  module_spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def field_value(config, field: str):
  """The field's value in `config`; a clear error for a field that does not exist."""
  node = config
  for part in field.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'{field} is not a field of the config (no {part!r} there)') from None
  return node


def _train_command(args, common: list[str], variant: Variant) -> list[str]:
  return [sys.executable, '-m', 'jaxgpt.train', '--config', args.config, *common,
          *(f'--config.{field}={value}' for field, value in variant.overrides)]


def _run(command: list[str], log_file: str, env: dict) -> int:
  with open(log_file, 'a') as log:
    log.write(f'$ {" ".join(command)}\n')
    log.flush()
    return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def _tail(log_file: str, lines: int = 15) -> str:
  with open(log_file) as f:
    return ''.join(f.readlines()[-lines:])


def _planned_steps(args, command: list[str], workdir: str, env: dict) -> dict:
  """--minutes: the step time of a short run of the same command, and the steps that fill the time; kept in
  the run directory so that a resumed variant keeps its plan."""
  plan_file = os.path.join(workdir, PLAN_FILE)
  if os.path.exists(plan_file):
    return json.load(open(plan_file))
  probe = workdir + '-probe'
  shutil.rmtree(probe, ignore_errors=True)
  returncode = _run([*command, '--workdir', probe, f'--config.train.num_steps={PROBE_STEPS}', *NO_EPOCHS,
                     '--config.train.final_eval_whole_split=False', '--config.train.eval_batches=1',
                     '--config.train.keep_best=False', '--config.train.early_stopping_patience=0',
                     '--config.sample.prompts=()'], os.path.join(workdir, 'train.log'), env)
  if returncode:
    raise RuntimeError(f'the {PROBE_STEPS}-step timing run failed (exit {returncode})')
  seconds = json.load(open(os.path.join(probe, 'results.json')))['seconds_per_step']
  shutil.rmtree(probe)
  plan = {'seconds_per_step': seconds, 'steps': max(PROBE_STEPS, int(args.minutes * 60 / seconds))}
  with open(plan_file, 'w') as f:
    json.dump(plan, f)
  return plan


def run_variant(args, common: list[str], variant: Variant, gpus: str | None) -> dict:
  """Trains the variant unless its run is done; its row of figures (with `error` if it failed)."""
  workdir = os.path.join(os.path.abspath(args.workdir), variant.name)
  results_file, log_file = os.path.join(workdir, 'results.json'), os.path.join(workdir, 'train.log')
  row = {'variant': variant.name, **dict(variant.overrides)}
  os.makedirs(workdir, exist_ok=True)
  env = {**os.environ, **({'CUDA_VISIBLE_DEVICES': gpus} if gpus is not None else {})}
  command = _train_command(args, common, variant)
  try:
    if not os.path.exists(results_file):
      plan = _planned_steps(args, command, workdir, env) if args.minutes else {}
      steps = [f'--config.train.num_steps={plan["steps"]}', *NO_EPOCHS] if plan else []
      returncode = _run([*command, *steps, '--workdir', workdir], log_file, env)
      if returncode:
        raise RuntimeError(f'jaxgpt.train failed (exit {returncode})')
  except RuntimeError as e:
    print(f'{variant.name}: {e}; the end of {log_file}:\n{_tail(log_file)}', file=sys.stderr, flush=True)
    return {**row, 'error': str(e)}
  results = json.load(open(results_file))
  plan_file = os.path.join(workdir, PLAN_FILE)
  plan = json.load(open(plan_file)) if os.path.exists(plan_file) else {}
  log = open(log_file).read() if os.path.exists(log_file) else ''  # none for a run trained outside the sweep
  params = re.findall(r'model: ([\d.]+)M parameters', log)
  return {**row, 'params_M': float(params[-1]) if params else None, 'steps': results['step'],
          'seconds_per_step': plan.get('seconds_per_step', results.get('seconds_per_step')),
          'train_seconds': results.get('train_seconds'), 'loss': results.get('loss'),
          'perplexity': results.get('perplexity'), 'bits_per_byte': results.get('bits_per_byte'),
          'best_step': results.get('best', {}).get('step'), 'stopped_early': results.get('stopped_early')}


def write_csv(path: str, variants: list[Variant], rows: dict) -> None:
  """sweep.csv: the variants that have ended, in sweep order, each with its values and figures."""
  fields = list(dict.fromkeys(field for v in variants for field, _ in v.overrides))
  temporary = path + '.tmp'
  with open(temporary, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['variant', *fields, *FIGURES], extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows[v.name] for v in variants if v.name in rows)
  os.replace(temporary, path)  # a reader never sees half a file


def _cell(value, form: str) -> str:
  return '' if value is None else form.format(value)


def print_table(variants: list[Variant], rows: dict) -> None:
  print(f'\n{"variant":<28} {"params":>8} {"step ms":>8} {"steps":>6} {"trained":>8} {"loss":>7} {"bits/byte":>9}')
  for v in variants:
    r = rows[v.name]
    if r.get('error'):
      print(f'{v.name:<28} failed: {r["error"]}')
      continue
    step_ms = None if r['seconds_per_step'] is None else 1000 * r['seconds_per_step']
    print(f'{v.name:<28} {_cell(r["params_M"], "{:.2f}M"):>8} {_cell(step_ms, "{:.1f}"):>8} {r["steps"]:>6} '
          f'{_cell(r["train_seconds"], "{:.0f}s"):>8} {_cell(r["loss"], "{:.3f}"):>7} '
          f'{_cell(r["bits_per_byte"], "{:.3f}"):>9}')


def sweep(args, common: list[str], variants: list[Variant]) -> dict:
  """Trains the variants, --parallel at a time; {name: row}."""
  os.makedirs(args.workdir, exist_ok=True)
  slots = queue.Queue()  # which GPUs each of the --parallel runs may use
  for slot in range(args.parallel):
    first = slot * args.gpus_per_variant
    slots.put(','.join(map(str, range(first, first + args.gpus_per_variant))) if args.gpus_per_variant else None)
  rows, lock = {}, threading.Lock()

  def job(variant: Variant) -> None:
    gpus = slots.get()
    try:
      row = run_variant(args, common, variant, gpus)
    finally:
      slots.put(gpus)
    with lock:
      rows[variant.name] = row
      print(json.dumps(row), flush=True)
      write_csv(os.path.join(args.workdir, 'sweep.csv'), variants, rows)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    for future in [pool.submit(job, v) for v in variants]:
      future.result()
  print_table(variants, rows)
  return rows


def variants_of(args) -> list[Variant]:
  """The --variant and --sweep variants, checked against the config."""
  variants = [named_variant(spec) for spec in args.variant]
  if args.sweep:
    config = load_config(args.config)
    sweeps, integer_fields = [], set()
    for spec in args.sweep:
      field, equals, values = spec.partition('=')
      if not equals or not values:
        raise ValueError(f'--sweep {spec!r} is not FIELD=VALUES, e.g. optim.lr=log:1e-4:1e-2:4')
      if field in (f for f, _ in sweeps):
        raise ValueError(f'{field} is swept twice: give all its values in one --sweep')
      current = field_value(config, field)
      integer = isinstance(current, int) and not isinstance(current, bool)
      if integer:
        integer_fields.add(field)
      sweeps.append((field, parse_values(values, integer, bool(args.random))))
    variants += grid_variants(sweeps, integer_fields, args.random, args.seed)
  names = [v.name for v in variants]
  if not variants:
    raise ValueError('nothing to sweep: give --sweep FIELD=VALUES (or --variant NAME:overrides)')
  if len(set(names)) < len(names):
    raise ValueError(f'two variants share a name: {", ".join(sorted({n for n in names if names.count(n) > 1}))}')
  return variants


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='the config file every variant starts from')
  parser.add_argument('--workdir', required=True, help='one run directory per variant is made under it')
  parser.add_argument('--sweep', action='append', default=[],
                      help='FIELD=VALUES: a,b,c | lin:LO:HI:N | log:LO:HI:N (| lin:LO:HI | log:LO:HI with --random)')
  parser.add_argument('--random', type=int, default=0, help='draw this many variants instead of the whole grid')
  parser.add_argument('--seed', type=int, default=0, help='the random search\'s seed')
  parser.add_argument('--variant', action='append', default=[],
                      help="NAME:a.b=value,c.d=value (overrides of --config; 'NAME:' for none); repeat it")
  parser.add_argument('--parallel', type=int, default=1, help='variants trained at once')
  parser.add_argument('--gpus_per_variant', type=int, default=0,
                      help='give each of the --parallel runs its own GPUs (CUDA_VISIBLE_DEVICES); 0 = all see all')
  parser.add_argument('--minutes', type=float, default=0.0,
                      help='size each variant to train for about this long (a timed 30-step run first); '
                           '0 = the steps the config gives')
  # --config.a.b=value flags are not this tool's: they pass through to every variant's commands.
  args, common = parser.parse_known_args()
  if any(not arg.startswith('--config.') for arg in common):
    parser.error(f'unknown arguments: {" ".join(a for a in common if not a.startswith("--config."))}')
  if args.parallel < 1 or args.random < 0 or args.gpus_per_variant < 0:
    parser.error('--parallel must be 1 or more, --random and --gpus_per_variant 0 or more')
  if args.minutes and args.parallel > 1 and not args.gpus_per_variant:
    parser.error('--minutes times each variant: with --parallel > 1 on shared devices they would time each other. '
                 'Use --parallel 1, or give each its own GPUs with --gpus_per_variant')
  try:
    variants = variants_of(args)
  except ValueError as e:
    parser.error(str(e))
  rows = sweep(args, common, variants)
  failed = [name for name, row in rows.items() if row.get('error')]
  if failed:
    sys.exit(f'{len(failed)} of {len(rows)} variants failed: {", ".join(failed)} (their train.log says why)')


if __name__ == '__main__':
  main()
