"""tools/sweep.py end to end on a tiny config: each variant gets the steps its speed allows."""

import json
import os
import subprocess
import sys

from conftest import REPO, TINY_OVERRIDES, override_args


def test_sweep_sizes_each_variant_by_its_speed_and_reports_bits_per_byte(tmp_path, data_cache):
  result = subprocess.run(
      [sys.executable, 'tools/sweep.py', '--config', 'configs/quickstart.py', '--minutes', '0.02',
       '--workdir', str(tmp_path), '--variant', 'one_layer:model.num_layers=1',
       '--variant', 'three_layers:model.num_layers=3', *override_args(TINY_OVERRIDES),
       f'--config.data.cache_dir={data_cache}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {row['variant']: row for row in map(json.loads, (l for l in result.stdout.splitlines() if l.startswith('{')))}
  assert rows['one_layer']['steps'] > rows['three_layers']['steps'] > 0  # a faster step buys more steps
  # Each variant's overrides were applied: two more layers of 64 x 256 GPT-2 blocks are 0.10M parameters.
  assert abs(rows['three_layers']['params_M'] - rows['one_layer']['params_M'] - 0.10) <= 0.01
  for name, row in rows.items():
    results = json.load(open(os.path.join(tmp_path, name, 'results.json')))
    assert 0 < row['bits_per_byte'] < 6
    # The run's own figures, not the probe's or another variant's.
    assert (results['step'], results['bits_per_byte']) == (row['steps'], row['bits_per_byte'])
  assert 'bits/byte' in result.stdout.splitlines()[-3]
