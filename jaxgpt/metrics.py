"""Throughput and MFU, and the writers that put metrics on the console, in TensorBoard and in metrics.jsonl."""

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp

from jaxgpt.config import JaxgptError

# Dense bf16 peak FLOP/s per device (per chip; per GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 float32 matmul on the default device: the CPU's practical peak."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops_per_device(configured: float) -> tuple[float, str]:
  """The peak used for MFU and where it came from."""
  if configured > 0:
    return configured, 'config'
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops, kind
  # CPU (or an unknown device): measure. Fake CPU devices share the same cores.
  return measure_matmul_flops() / jax.local_device_count(), f'measured {kind} matmul'


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class TrainingClock:
  """Wall time spent in training steps alone, interval by interval.

  Validations and saves run inside `paused()` and are left out, so the
  tokens/s, MFU and seconds per step computed from `take()` count the steps
  and nothing else, whatever the log, eval and checkpoint intervals.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self._start, self._paused, self.steps = clock(), 0.0, 0

  def step(self) -> None:
    self.steps += 1

  @contextlib.contextmanager
  def paused(self):
    begin = self._clock()
    try:
      yield
    finally:
      self._paused += self._clock() - begin

  def take(self) -> tuple[int, float]:
    """(steps, seconds in them) since the last take; the next interval starts now."""
    now = self._clock()
    taken = self.steps, now - self._start - self._paused
    self._start, self._paused, self.steps = now, 0.0, 0
    return taken


class MetricWriter:
  """Console lines and TensorBoard scalars, written by process 0 only."""

  def __init__(self, workdir: str | None):
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active and workdir:
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes logs
      self._tb = SummaryWriter(logdir=f'{workdir}/tensorboard')

  def log(self, message: str) -> None:
    if self._active:
      print(message, flush=True)

  def scalars(self, step: int, values: dict) -> None:
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class StepMetrics:
  """The train step's metrics on their way from the device to the logs and `metrics.jsonl`.

  They stay on the device until `pull`, which the loop calls only where it waits for the device
  anyway (log steps, saves): pulling after every step would stall the dispatch of the next one.
  Each pulled step is appended to `metrics.jsonl` (one JSON object per step, process 0 only) and
  checked for an update the train step skipped because something in it was not finite.
  """

  def __init__(self, path: str, resumed_at: int, on_nonfinite: str, log):
    self._path = path if jax.process_index() == 0 else None
    self._on_nonfinite = on_nonfinite
    self._log = log
    self._on_device = []  # (step, metrics) not yet pulled
    self._pulled = []  # records pulled since the last `take`
    self.skipped = 0  # updates skipped by this process's run
    if self._path and os.path.exists(self._path):
      _keep_records_up_to(self._path, resumed_at)

  def add(self, step: int, metrics: dict) -> None:
    self._on_device.append((step, metrics))

  def pull(self) -> None:
    """Brings the pending steps to the host; in 'stop' mode, raises at a skipped one."""
    records = [{'step': step, **{k: float(v) for k, v in m.items() if k != 'finite'},
                **({} if m['finite'] else {'skipped': True})}
               for step, m in jax.device_get(self._on_device)]
    self._on_device = []
    self._pulled += records
    if self._path:
      with open(self._path, 'a') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    skipped = [r for r in records if r.get('skipped')]
    if not skipped:
      return
    first = skipped[0]
    problem = f'loss {first["loss"]}, grad norm {first["grad_norm"]}, learning rate {first["learning_rate"]:.3g}'
    if self._on_nonfinite == 'stop':
      raise JaxgptError(
          f'step {first["step"]}: the update is not finite ({problem}). Stopped without applying it '
          "(train.on_nonfinite='stop'); no checkpoint holds this step or a later one. Lower optim.lr or "
          "raise optim.warmup_steps, check the data, or set train.on_nonfinite='skip'.")
    self.skipped += len(skipped)
    self._log(f'warning: skipped the non-finite update of step{"s" if len(skipped) > 1 else ""} '
              f'{", ".join(str(r["step"]) for r in skipped)} (step {first["step"]}: {problem}); '
              f'{self.skipped} skipped in this run so far.')

  def take(self) -> list[dict]:
    """The records pulled since the last call."""
    records, self._pulled = self._pulled, []
    return records


def _keep_records_up_to(path: str, step: int) -> None:
  """Drops the records a killed run wrote past its last checkpoint (and a line it left half-written)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record['step'] <= step:
        kept.append(line)
  with open(path, 'w') as f:
    f.writelines(kept)
