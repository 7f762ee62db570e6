"""Experiments: epochs, early stopping and the best checkpoint in a real run; jaxgpt.compare's tables and plots of
real runs; tools/sweep.py's grid, random search and resuming; W&B's missing extra."""

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_OVERRIDES, apply_overrides, override_args
from configs import quickstart
from jaxgpt.config import JaxgptError
from jaxgpt.metrics import read_records

sys.path.insert(0, os.path.join(REPO, 'tools'))
import sweep  # noqa: E402

PATIENCE = 2
EPOCHS = 0.1


# --- epochs, early stopping and the best checkpoint, in one real run ------------------------------------------


@pytest.fixture(scope='module')
def stopping_run(tmp_path_factory, data_cache):
  """A run whose validation loss must rise: a learning rate of 0.5 throws the tiny model far from its start. Saves
  only at new bests and where it stops (checkpoint_every is past the end), keeping 1 step besides the best. Then the
  same command again, which must train no further."""
  from jaxgpt.train import train
  overrides = {**TINY_OVERRIDES, 'train.num_epochs': EPOCHS, 'train.eval_every': 2, 'train.log_every': 2,
               'train.checkpoint_every': 1000, 'train.keep_checkpoints': 1, 'train.keep_best': True,
               'train.early_stopping_patience': PATIENCE, 'optim.lr': 0.5, 'optim.warmup_steps': 1,
               'sample.prompts': ()}
  config = apply_overrides(quickstart.get_config(), overrides)
  config.data.cache_dir = data_cache
  workdir = str(tmp_path_factory.mktemp('stopping_run'))
  logs = []
  for _ in range(2):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      results = train(config, workdir)
    logs.append(out.getvalue())
  return config, workdir, results, logs


def _sampled_validations(workdir: str) -> dict[int, float]:
  """Each validation's loss on the held-out sample, by step. Where the run ends the whole split's figures follow
  (another measure, logged after the sample's; once more by the run run again)."""
  losses = {}
  for record in read_records(os.path.join(workdir, 'scalars.jsonl')):
    if 'val/loss' in record:
      losses.setdefault(record['step'], record['val/loss'])
  return losses


def test_num_epochs_sets_the_steps_from_the_training_splits_tokens(stopping_run):
  config, workdir, results, (log, _) = stopping_run
  from jaxgpt.data import builder
  train_tokens = builder.prepare(config.data, log=lambda message: None).report['train']['tokens']
  # A step reads batch_size rows of seq_len + 1 tokens of the packed split: 8 x 65.
  steps = math.ceil(EPOCHS * train_tokens / (8 * 65))
  assert json.load(open(os.path.join(workdir, 'config.json')))['train']['num_steps'] == steps
  assert f'step 2/{steps} |' in log and f'| epoch {2 * 8 * 65 / train_tokens:.3f}' in log
  assert results['epochs'] == pytest.approx(results['step'] * 8 * 65 / train_tokens)


def test_early_stopping_stops_at_the_validation_its_patience_gives(stopping_run):
  config, workdir, results, (log, _) = stopping_run
  sampled = list(_sampled_validations(workdir).items())
  # The rule, by hand: stop at the PATIENCE-th validation in a row that does not go below the best.
  best_step, best_loss, since, stop = None, math.inf, 0, None
  for step, loss in sampled:
    if loss < best_loss:
      best_step, best_loss, since = step, loss, 0
    else:
      since += 1
    if since == PATIENCE:
      stop = step
      break
  assert stop is not None and stop < config.train.num_steps, sampled  # the run's loss must rise
  assert sampled[-1][0] == stop == results['step']  # no validation past the stop
  assert results['stopped_early'] is True
  assert results['best'] == {'step': best_step, 'loss': best_loss, 'checkpoint_kept': True}
  assert (f'step {stop}: early stopping: the validation loss has not gone below {best_loss:.4f} (step {best_step})'
          in log)


def test_the_best_checkpoint_outlives_rotation_and_holds_the_best_params(stopping_run):
  config, workdir, results, _ = stopping_run
  from jaxgpt import inference, run_dir
  from jaxgpt.evaluate import held_out_split
  best, stop = results['best']['step'], results['step']
  # keep_checkpoints=1 keeps the newest step: the best is there only because it is kept.
  assert best < stop
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()) == [best, stop]
  _, tokenizer = run_dir.load_run(workdir)
  sampled = _sampled_validations(workdir)
  for step in (best, stop):
    loaded = inference.load(config, tokenizer, workdir, step)
    loss = held_out_split(loaded, config, tokenizer, whole_split=False)['loss']
    assert loss == pytest.approx(sampled[step], rel=1e-5)  # each step's own params, as validated in training
  assert sampled[stop] > sampled[best] + 1


def test_an_early_stopped_run_run_again_trains_no_further(stopping_run):
  _, workdir, results, (first_log, again_log) = stopping_run
  stop = results['step']
  assert f'step {stop}: this run stopped early ({PATIENCE} validations without a lower loss)' in again_log
  assert 'compiled and ran the first step' not in again_log
  assert results['stopped_early'] is True and results['best']['step'] < stop
  steps = [r['step'] for r in read_records(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == list(range(1, stop + 1))


def test_stopping_settings_must_not_be_negative(tiny_config):
  from jaxgpt.config import validate
  tiny_config.train.early_stopping_patience = -1
  with pytest.raises(JaxgptError, match='train.early_stopping_patience=-1 must be 0'):
    validate(tiny_config)


def test_validations_count_only_strict_improvements_and_survive_a_resume():
  from jaxgpt.stopping import Validations
  validations = Validations(patience=3)
  news = [validations.add(step, loss) for step, loss in ((10, 3.0), (20, 2.5), (30, 2.5), (40, float('nan')))]
  assert news == [True, True, False, False] and not validations.exhausted
  resumed = Validations.from_meta(json.loads(json.dumps(validations.to_meta())), patience=3)
  assert (resumed.best_step, resumed.best_loss, resumed.since_best) == (20, 2.5, 2)
  assert resumed.add(50, 2.6) is False and resumed.exhausted
  assert not Validations.from_meta(resumed.to_meta(), patience=0).exhausted  # patience 0: never stops


# --- jaxgpt.compare -------------------------------------------------------------------------------------------


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _pixels_of(image: np.ndarray, color: str) -> int:
  from matplotlib.colors import to_rgb
  return int((np.abs(image[..., :3] - np.array(to_rgb(color))).max(axis=-1) < 0.02).sum())


def test_compare_tables_the_runs_final_figures_and_plots_their_curves(trained_run, stopping_run, tmp_path):
  from matplotlib.image import imread
  from jaxgpt.compare import AXES, compare
  _, stopped, _, _ = stopping_run
  compare([trained_run, stopped], str(tmp_path / 'report'))
  rows = list(csv.DictReader(open(tmp_path / 'report' / 'runs.csv')))
  assert [row['run'] for row in rows] == [os.path.basename(trained_run), os.path.basename(stopped)]
  for row, run in zip(rows, (trained_run, stopped)):
    results = json.load(open(os.path.join(run, 'results.json')))
    for key in ('loss', 'perplexity', 'bits_per_byte', 'train_seconds'):
      assert float(row[key]) == results[key]
    assert int(row['step']) == results['step'] and int(row['tokens']) == results['step'] * 8 * 64
  assert rows[0]['best_step'] == '' and int(rows[1]['best_step']) == json.load(
      open(os.path.join(stopped, 'results.json')))['best']['step']
  markdown = (tmp_path / 'report' / 'runs.md').read_text()
  assert f'| {os.path.basename(stopped)} | {int(rows[1]["step"]):,} |' in markdown

  images = {}
  for file, _, _ in AXES:
    data = (tmp_path / 'report' / file).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    images[file] = imread(tmp_path / 'report' / file)
    assert images[file].shape == (400, 1100, 4)
    # Each run's line, in its colour (C0, C1): drawn in both panels, not a blank figure.
    assert _pixels_of(images[file], 'C0') > 100 and _pixels_of(images[file], 'C1') > 100, file

  # The same run, its validation losses halved: its plots change, under the same name.
  changed = tmp_path / 'changed' / os.path.basename(stopped)
  changed.mkdir(parents=True)
  for name in ('config.json', 'results.json'):
    shutil.copy(os.path.join(stopped, name), changed / name)
  with open(changed / 'scalars.jsonl', 'w') as f:
    for record in read_records(os.path.join(stopped, 'scalars.jsonl')):
      if 'val/loss' in record:
        record['val/loss'] /= 2
      f.write(json.dumps(record) + '\n')
  compare([trained_run, str(changed)], str(tmp_path / 'changed_report'))
  for file in images:
    assert not np.array_equal(imread(tmp_path / 'changed_report' / file), images[file]), file


def test_compare_names_a_directory_that_is_not_a_run(tmp_path, trained_run):
  from jaxgpt.compare import compare
  with pytest.raises(JaxgptError, match=f'{tmp_path} is not a jaxgpt run directory'):
    compare([trained_run, str(tmp_path)], str(tmp_path / 'report'))


# --- tools/sweep.py --------------------------------------------------------------------------------------------


def test_sweep_values_lists_and_evenly_spaced_numbers():
  assert sweep.parse_values('1e-3,3e-3', False, False) == ['1e-3', '3e-3']
  assert sweep.parse_values('log:1e-4:1e-2:3', False, False) == ['0.0001', '0.001', '0.01']
  assert sweep.parse_values('lin:0:0.3:4', False, False) == ['0', '0.1', '0.2', '0.3']
  assert sweep.parse_values('lin:2:8:4', True, False) == ['2', '4', '6', '8']  # an integer field
  assert sweep.parse_values('log:16:128:4', True, False) == ['16', '32', '64', '128']
  assert sweep.parse_values('log:1e-4:1e-2', False, True) == sweep.Range(1e-4, 1e-2, log=True)
  for spec, random_search, message in (('log:0:1:3', False, 'positive ends'), ('lin:1:2', False, 'needs lin:LO:HI:N'),
                                       ('lin:1:2:x', False, "'x' in 'lin:1:2:x' is not a number"),
                                       ('lin:1:2:2.5', False, 'whole number'), ('lin:1:2:3', True, 'same value'),
                                       ('a,,b', False, 'empty value')):
    with pytest.raises(ValueError, match=message):
      sweep.parse_values(spec, 'lin:1:2:3' == spec, random_search)


def test_a_grid_has_every_combination_and_a_random_search_draws_from_it():
  sweeps = [('model.embed_dim', ['64', '128']), ('optim.lr', ['0.001', '0.003', '0.01'])]
  grid = sweep.grid_variants(sweeps, {'model.embed_dim'})
  assert [v.name for v in grid] == ['embed_dim=64,lr=0.001', 'embed_dim=64,lr=0.003', 'embed_dim=64,lr=0.01',
                                    'embed_dim=128,lr=0.001', 'embed_dim=128,lr=0.003', 'embed_dim=128,lr=0.01']
  assert grid[4].overrides == (('model.embed_dim', '128'), ('optim.lr', '0.003'))
  drawn = sweep.grid_variants(sweeps, set(), random_count=4, seed=1)
  assert len({v.name for v in drawn}) == 4 and {v.name for v in drawn} < {v.name for v in grid}
  assert drawn == sweep.grid_variants(sweeps, set(), random_count=4, seed=1)  # the seed decides
  assert drawn != sweep.grid_variants(sweeps, set(), random_count=4, seed=2)
  with pytest.raises(ValueError, match='more variants than the 6 combinations'):
    sweep.grid_variants(sweeps, set(), random_count=7)
  # A range: every draw inside it, integers for an integer field; two fields ending alike keep their full names.
  ranged = sweep.grid_variants([('optim.lr', sweep.Range(1e-4, 1e-2, log=True)),
                                ('model.num_layers', sweep.Range(2, 6, log=False))], {'model.num_layers'},
                               random_count=20, seed=0)
  lrs = [float(dict(v.overrides)['optim.lr']) for v in ranged]
  assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and min(lrs) < 1e-3 < max(lrs)  # spread in log scale
  assert {dict(v.overrides)['model.num_layers'] for v in ranged} <= {'2', '3', '4', '5', '6'}
  assert [v.name for v in sweep.grid_variants([('a.x', ['1']), ('b.x', ['2'])], set())] == ['a.x=1,b.x=2']


def test_sweep_fields_are_checked_against_the_config():
  args = lambda *specs: type('Args', (), {'variant': [], 'sweep': list(specs), 'random': 0, 'seed': 0,
                                          'config': os.path.join(REPO, 'configs', 'quickstart.py')})()
  variants = sweep.variants_of(args('model.embed_dim=lin:64:128:3', 'optim.lr=1e-3'))
  assert [v.name for v in variants] == ['embed_dim=64,lr=1e-3', 'embed_dim=96,lr=1e-3', 'embed_dim=128,lr=1e-3']
  with pytest.raises(ValueError, match="optim.learning_rate is not a field of the config"):
    sweep.variants_of(args('optim.learning_rate=1e-3,1e-2'))
  with pytest.raises(ValueError, match='optim.lr is swept twice'):
    sweep.variants_of(args('optim.lr=1e-3', 'optim.lr=1e-2'))


def test_a_sweep_run_again_skips_finished_variants_and_resumes_a_half_done_one(trained_run, data_cache, tmp_path):
  """Two variants of trained_run's 10-step command: one finished (a copy of it), one stopped after its checkpoint
  at step 10 (a copy without results.json), to go on to 12. Only that one trains, from its checkpoint."""
  root = tmp_path / 'sweep'
  finished, half_done = root / 'num_steps=10', root / 'num_steps=12'
  shutil.copytree(trained_run, finished)
  shutil.copytree(trained_run, half_done)
  os.remove(half_done / 'results.json')
  done = subprocess.run([sys.executable, 'tools/sweep.py', '--config', 'configs/quickstart.py', '--workdir', str(root),
                         '--sweep', 'train.num_steps=10,12', '--parallel', '2',
                         *override_args({**TINY_OVERRIDES, 'sample.prompts': '()', 'data.cache_dir': data_cache,
                                         'train.final_eval_whole_split': False})],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert not (finished / 'train.log').exists()  # not run again
  log = (half_done / 'train.log').read_text()
  assert 'resumed from step 10' in log and 'compiled and ran the first step' in log
  assert [r['step'] for r in read_records(half_done / 'metrics.jsonl')] == list(range(1, 13))
  rows = list(csv.DictReader(open(root / 'sweep.csv')))
  assert [(r['variant'], r['train.num_steps']) for r in rows] == [('num_steps=10', '10'), ('num_steps=12', '12')]
  for row, run in zip(rows, (finished, half_done)):
    results = json.load(open(run / 'results.json'))
    assert int(row['steps']) == results['step'] == int(row['train.num_steps'])
    assert float(row['loss']) == results['loss'] and float(row['bits_per_byte']) == results['bits_per_byte']
  assert float(rows[1]['params_M']) > 0 and rows[0]['params_M'] == ''  # the copied run has no train.log
  printed = {r['variant']: r for r in map(json.loads, (line for line in done.stdout.splitlines() if line[:1] == '{'))}
  assert printed['num_steps=12']['loss'] == json.load(open(half_done / 'results.json'))['loss']


# --- Weights & Biases -------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec('wandb') is not None, reason='wandb is installed: the error cannot show')
def test_wandb_logging_without_wandb_names_the_extra_before_any_work(tiny_config, tmp_path):
  from jaxgpt.train import train
  tiny_config.train.wandb_project = 'jaxgpt-test'
  with pytest.raises(JaxgptError, match=r"wandb not installed: .*'wandb' extra\. Run: pip install -e \"\.\[wandb\]\""):
    train(tiny_config, str(tmp_path))
  assert not (tmp_path / 'config.json').exists()


@pytest.mark.skipif(importlib.util.find_spec('wandb') is None, reason='wandb is not installed (jaxgpt[wandb])')
def test_wandb_gets_the_scalars_and_a_resumed_writer_keeps_its_run(tiny_config, tmp_path, monkeypatch):
  from jaxgpt.metrics import WANDB_RUN_FILE, MetricWriter
  monkeypatch.setenv('WANDB_MODE', 'offline')
  tiny_config.train.wandb_project = 'jaxgpt-test'
  first = MetricWriter(str(tmp_path), tiny_config)
  first.scalars(1, {'train/loss': 2.0})
  first.close()
  run_id = (tmp_path / WANDB_RUN_FILE).read_text()
  again = MetricWriter(str(tmp_path), tiny_config)
  again.scalars(2, {'train/loss': 1.5})
  again.close()
  assert (tmp_path / WANDB_RUN_FILE).read_text() == run_id
  assert any(run_id in name for name in os.listdir(tmp_path / 'wandb'))
