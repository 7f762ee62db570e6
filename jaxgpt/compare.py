"""Compare runs: `python -m jaxgpt.compare RUN... [--out DIR]`.

Reads each run directory (local or gs://) as jaxgpt.train left it: results.json (the final figures),
scalars.jsonl (training loss at each log step, validation loss at each validation, each with the run's
wall time) and config.json (tokens per step). Writes to --out:

  runs.md, runs.csv     the final figures, one row per run (runs.md is printed too)
  loss_vs_steps.png     training (left) and validation (right) loss, one line per run, labelled
  loss_vs_tokens.png    with the run's name (its directory's), against steps, tokens trained and
  loss_vs_time.png      wall time (counted across resumes; data preparation and compiling included)

A run still training has no results.json: it is drawn as far as it has got, its final figures left
blank. Plots need jaxgpt[plots] (matplotlib).
"""

import csv
import dataclasses
import io
import json

from absl import flags

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra, run_cli
from jaxgpt.metrics import RESULTS_FILE, SCALARS_FILE, read_records
from jaxgpt.run_dir import CONFIG_FILE

# Final figures in the table: (column, heading, format).
COLUMNS = (('step', 'steps', '{:,}'), ('tokens', 'tokens', '{:,}'), ('train_seconds', 'training time', '{:,.0f} s'),
           ('train_loss', 'train loss', '{:.4f}'), ('loss', 'val loss', '{:.4f}'),
           ('perplexity', 'perplexity', '{:.2f}'), ('bits_per_byte', 'bits/byte', '{:.4f}'),
           ('best_step', 'best step', '{}'), ('best_loss', 'best loss', '{:.4f}'),
           ('stopped_early', 'stopped early', '{}'))
# Each plot's x axis: (file, label, value of a record).
AXES = (('loss_vs_steps.png', 'step', lambda run, r: r['step']),
        ('loss_vs_tokens.png', 'tokens trained', lambda run, r: r['step'] * run.tokens_per_step),
        ('loss_vs_time.png', 'wall time (minutes)', lambda run, r: r['seconds'] / 60))
FIGURE_INCHES, DPI = (11, 4), 100  # each PNG is 1100 x 400 pixels


@dataclasses.dataclass
class Run:
  name: str
  directory: str
  tokens_per_step: int
  results: dict  # {} while the run is still training
  train: list[dict]  # scalars.jsonl records with train/loss
  validation: list[dict]  # and those with val/loss

  def figures(self) -> dict:
    """The table's row: the final figures from results.json, the last logged training loss."""
    best = self.results.get('best', {})
    step = self.results.get('step')
    return {'run': self.name, 'directory': self.directory, 'step': step,
            'tokens': None if step is None else step * self.tokens_per_step,
            'train_seconds': self.results.get('train_seconds'),
            'train_loss': self.train[-1]['train/loss'] if self.train else None,
            'loss': self.results.get('loss'), 'perplexity': self.results.get('perplexity'),
            'bits_per_byte': self.results.get('bits_per_byte'), 'best_step': best.get('step'),
            'best_loss': best.get('loss'), 'stopped_early': self.results.get('stopped_early')}


def read_run(directory: str, name: str) -> Run:
  root = paths.path(directory)
  if not (root / CONFIG_FILE).exists():
    raise JaxgptError(f'{directory} is not a jaxgpt run directory (no {CONFIG_FILE}). Pass the --workdir you gave '
                      'jaxgpt.train.')
  config = json.loads((root / CONFIG_FILE).read_text())
  results = json.loads((root / RESULTS_FILE).read_text()) if (root / RESULTS_FILE).exists() else {}
  records = read_records(root / SCALARS_FILE)
  # Tokens trained as the training logs count them: the targets of every row.
  return Run(name, directory, config['batch_size'] * config['seq_len'], results,
             [r for r in records if 'train/loss' in r], [r for r in records if 'val/loss' in r])


def run_names(directories: list[str]) -> list[str]:
  """Each run's directory name; more of its path where two runs share one."""
  parts = [paths.expand(d).rstrip('/').split('/') for d in directories]
  for depth in range(1, max(map(len, parts)) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  raise JaxgptError(f'a run is given twice: {", ".join(directories)}. Name each run once.')


def table_markdown(rows: list[dict]) -> str:
  lines = ['| run | ' + ' | '.join(heading for _, heading, _ in COLUMNS) + ' |',
           '|---' * (len(COLUMNS) + 1) + '|']
  for row in rows:
    cells = ['' if row[key] is None else form.format(row[key]) for key, _, form in COLUMNS]
    lines.append(f'| {row["run"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def table_csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)  # floats as repr: they read back exactly
  return out.getvalue()


def plot(runs: list[Run], out) -> list[str]:
  """One PNG per x axis, training and validation loss side by side; returns the files written."""
  require_extra('plots', 'matplotlib')
  import matplotlib
  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot as plt
  written = []
  for file, label, x_of in AXES:
    figure, panels = plt.subplots(1, 2, figsize=FIGURE_INCHES, dpi=DPI)
    for i, run in enumerate(runs):
      color = f'C{i % 10}'
      for panel, records, key in ((panels[0], run.train, 'train/loss'), (panels[1], run.validation, 'val/loss')):
        panel.plot([x_of(run, r) for r in records], [r[key] for r in records], color=color, label=run.name,
                   marker='.' if len(records) < 30 else None)
    for panel, title in zip(panels, ('training loss', 'validation loss')):
      panel.set(title=title, xlabel=label, ylabel='loss (nats per token)')
      panel.grid(alpha=0.3)
    panels[1].legend(fontsize='small')
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=DPI)
    plt.close(figure)
    (out / file).write_bytes(buffer.getvalue())
    written.append(file)
  return written


def compare(directories: list[str], out_dir: str) -> list[dict]:
  """Writes the table and plots of the runs in `directories` to `out_dir`; returns the table's rows."""
  if not directories:
    raise JaxgptError('no runs given. Pass run directories: python -m jaxgpt.compare runs/a runs/b --out report')
  runs = [read_run(d, name) for d, name in zip(directories, run_names(directories))]
  out = paths.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = [run.figures() for run in runs]
  (out / 'runs.md').write_text(table_markdown(rows))
  (out / 'runs.csv').write_text(table_csv(rows))
  plots = plot(runs, out)
  print(table_markdown(rows))
  for run in runs:
    if not run.train:
      print(f'{run.name}: no {SCALARS_FILE} (trained by a jaxgpt before it wrote one): figures only, no curves')
  print(f'wrote runs.md, runs.csv, {", ".join(plots)} to {out_dir}')
  return rows


def main(argv):
  compare(argv[1:], flags.FLAGS.out)


def cli():
  flags.DEFINE_string('out', 'comparison', 'Directory (local or gs://) for the table and plots.')
  run_cli(main)


if __name__ == '__main__':
  cli()
