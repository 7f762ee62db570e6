"""Human A/B evaluation: blind sheets of two runs' completions, and their tally into win rates.

`python -m jaxgpt.evaluate --compare RUN_A RUN_B --prompts FILE [--out DIR]` continues each
prompt with both runs (the same seeded sampling for both) and writes DIR/sheet.csv for the
raters: id, prompt, output_1, output_2 and an empty preference column. Which run wrote
output 1 is drawn at random for each row (seeded), and only DIR/key.json says: keep it from
the raters. Each rater fills in a copy of the sheet with 1, 2 or tie (a blank row is not
judged), and `--tally SHEET... --key DIR/key.json` counts every judged row of every sheet.

A run's win rate is its wins plus half its ties, over the judged rows; its 95% interval is
Wilson's score interval for that proportion, which stays inside [0, 1] and holds up for the
few dozen judgments a sheet usually gets. Counting a tie as half a win (not as a draw left
out) keeps the two runs' rates summing to 1; the ties are reported beside them.
"""

import csv
import hashlib
import io
import json
import math
import random
import sys
from collections.abc import Sequence

import jax

from jaxgpt import inference, paths, run_dir
from jaxgpt.config import JaxgptError
from jaxgpt.evaluation import json_lines
from jaxgpt.sample import Sampling, complete, encode_prompt, fitting_max_new_tokens

SHEET_FILE, KEY_FILE = 'sheet.csv', 'key.json'
COLUMNS = ('id', 'prompt', 'output_1', 'output_2', 'preference')
CHOICES = ('1', '2', 'tie')
Z_95 = 1.959963984540054  # the standard normal's 97.5% point: statistics.NormalDist().inv_cdf(0.975)


def read_prompts(path: str) -> list[str]:
  """The "prompt" field of each line of a JSONL file; each bad line is named."""
  prompts = []
  for number, record in json_lines(path, 'the prompts file', ': give one {"prompt": "..."} object per line'):
    if not (isinstance(record, dict) and isinstance(record.get('prompt'), str) and record['prompt']):
      raise JaxgptError(f'{path}:{number} needs a non-empty string field "prompt".')
    prompts.append(record['prompt'])
  if not prompts:
    raise JaxgptError(f'{path} has no prompts.')
  return prompts


def run_completions(workdir: str, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, step: int | None = None,
                    mesh: dict | None = None, dtype: str | None = None) -> tuple[int, list[str]]:
  """(checkpoint step, each prompt's continuation) of the run in `workdir`, on a mesh of every device."""
  config, tokenizer = run_dir.load_run(workdir)
  longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
  max_new_tokens, note = fitting_max_new_tokens(max_new_tokens, config.model.max_len, longest)
  if note:
    print(f'{workdir}: {note}', file=sys.stderr)
  sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
  loaded = inference.load(config, tokenizer, workdir, step, mesh=inference.make_mesh(mesh, jax.devices()),
                          dtype=dtype)
  with loaded.activation_rules():
    return loaded.step, [c.text for c in complete(loaded.model, loaded.params, tokenizer, prompts, sampling)]


def _check_no_sheet(out: str) -> None:
  if (paths.path(out) / SHEET_FILE).exists():
    raise JaxgptError(f'{out} already holds a sheet ({SHEET_FILE}), which raters may be filling in. '
                      'Give another --out directory.')


def _fingerprint(prompt: str) -> str:
  return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def write_sheet(out: str, prompts: Sequence[str], outputs: dict[str, Sequence[str]], seed: int = 0,
                about: dict | None = None) -> tuple[str, str]:
  """The blind sheet and its key in `out` from `outputs` (run -> one output per prompt); returns their paths.

  The key records, per row, which run is output 1 and which output 2, and a fingerprint of the
  prompt, so a sheet tallied against another comparison's key is caught. `about` (the runs'
  steps, the sampling) is kept in the key too.
  """
  runs = list(outputs)
  if len(runs) != 2 or any(len(outputs[run]) != len(prompts) for run in runs):
    raise ValueError('write_sheet compares two runs, with one output per prompt each')
  _check_no_sheet(out)
  directory = paths.path(out)
  rng = random.Random(seed)
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(COLUMNS)
  rows = {}
  for number, prompt in enumerate(prompts, 1):
    first, second = runs if rng.random() < 0.5 else runs[::-1]
    writer.writerow([number, prompt, outputs[first][number - 1], outputs[second][number - 1], ''])
    rows[str(number)] = {'output_1': first, 'output_2': second, 'prompt': _fingerprint(prompt)}
  directory.mkdir(parents=True, exist_ok=True)
  (directory / KEY_FILE).write_text(json.dumps({'runs': runs, **(about or {}), 'rows': rows}, indent=2))
  (directory / SHEET_FILE).write_text(text.getvalue())
  return f'{out.rstrip("/")}/{SHEET_FILE}', f'{out.rstrip("/")}/{KEY_FILE}'  # as the user named the directory


def compare(run_a: str, run_b: str, prompts_file: str, out: str, *, seed: int = 0, **sampling) -> dict:
  """Both runs' continuations of the prompts in `prompts_file`, as a blind sheet and its key in `out`.

  Returns the number of prompts and the sheet's and key's paths ('' on processes other than 0).

  `sampling`: run_completions's max_new_tokens, temperature, top_p, step, mesh and dtype,
  the same for both runs; each prompt's continuation is seeded by `seed`.
  """
  if paths.expand(run_a).rstrip('/') == paths.expand(run_b).rstrip('/'):
    raise JaxgptError(f'--compare needs two different runs; both are {run_a}.')
  if not prompts_file:
    raise JaxgptError('--compare needs --prompts: a JSONL file of {"prompt": ...}, one per line.')
  prompts = read_prompts(prompts_file)
  _check_no_sheet(out)  # before the generation, not after it
  steps, outputs = {}, {}
  for run in (run_a, run_b):
    steps[run], outputs[run] = run_completions(run, prompts, seed=seed, **sampling)
  about = {'steps': steps, 'seed': seed, 'sampling': {k: v for k, v in sampling.items() if k != 'mesh'}}
  sheet, key = write_sheet(out, prompts, outputs, seed, about) if jax.process_index() == 0 else ('', '')
  return {'prompts': len(prompts), 'sheet': sheet, 'key': key}


# --- the tally --------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson's score interval for a proportion of `successes` in `n` > 0 trials."""
  p = successes / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, center - half), min(1.0, center + half)


def _read_sheet(path: str) -> list[dict]:
  try:
    text = paths.path(path).read_text()
  except OSError as e:
    raise JaxgptError(f'cannot read the sheet {path} ({e.strerror or e}).') from None
  rows = list(csv.DictReader(io.StringIO(text)))
  if not rows or any(column not in rows[0] for column in COLUMNS):
    raise JaxgptError(f'{path} is not an A/B sheet: it needs the columns {", ".join(COLUMNS)} '
                      '(as `--compare` writes them) and at least one row.')
  return rows


def tally(sheets: Sequence[str], key_file: str) -> dict:
  """Wins, losses, ties, win rate and its 95% interval for each run, over every judged row of `sheets`."""
  try:
    key = json.loads(paths.path(key_file).read_text())
    runs, key_rows = key['runs'], key['rows']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise JaxgptError(f'{key_file} is not the key.json that `--compare` wrote ({e}).') from None
  counts = {run: {'wins': 0, 'losses': 0, 'ties': 0} for run in runs}
  judged = blank = 0
  for sheet in sheets:
    for line, row in enumerate(_read_sheet(sheet), 2):  # line 1 is the header
      where = f'{sheet} line {line} (id {row["id"]})'
      entry = key_rows.get(row['id'])
      if entry is None or entry['prompt'] != _fingerprint(row['prompt']):
        raise JaxgptError(f'{where} is not in {key_file}: the sheet belongs to another comparison, or its id or '
                          'prompt was edited. Tally each sheet with the key written beside it.')
      preference = (row['preference'] or '').strip().lower()
      if not preference:
        blank += 1
        continue
      if preference not in CHOICES:
        raise JaxgptError(f'{where}: preference {row["preference"]!r} is not one of {", ".join(CHOICES)} '
                          '(or blank, for a row not judged).')
      judged += 1
      if preference == 'tie':
        for run in runs:
          counts[run]['ties'] += 1
      else:
        winner = entry[f'output_{preference}']
        counts[winner]['wins'] += 1
        counts[next(run for run in runs if run != winner)]['losses'] += 1
  if not judged:
    raise JaxgptError(f'no row of {", ".join(sheets)} is judged yet: fill in the preference column with '
                      f'{", ".join(CHOICES)} first.')
  for run, c in counts.items():
    score = c['wins'] + c['ties'] / 2
    c['win_rate'] = score / judged
    c['interval_95'] = wilson_interval(score, judged)
  return {'runs': counts, 'judged': judged, 'blank': blank, 'sheets': len(sheets)}


def format_tally(result: dict) -> str:
  """The tally as a Markdown table, with what was counted and how."""
  lines = [f'{result["judged"]} judged rows in {result["sheets"]} sheet(s), {result["blank"]} left blank; '
           'a tie counts half a win for each run',
           '| run | wins | losses | ties | win rate | 95% interval (Wilson) |', '|---|---:|---:|---:|---:|---|']
  for run, c in result['runs'].items():
    low, high = c['interval_95']
    lines.append(f'| {run} | {c["wins"]} | {c["losses"]} | {c["ties"]} | {c["win_rate"]:.3f} | '
                 f'{low:.3f} to {high:.3f} |')
  return '\n'.join(lines)
