"""Throughput and MFU, and the writers that put a run's metrics on the console, in TensorBoard, in its JSON-lines
files (what jaxgpt.compare reads) and, when asked, in Weights & Biases."""

import contextlib
import json
import sys
import time

import jax
import jax.numpy as jnp

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra

# A run's metrics files, in its workdir.
RESULTS_FILE = 'results.json'  # the final figures
METRICS_FILE = 'metrics.jsonl'  # every step's loss, grad norm and learning rate
SCALARS_FILE = 'scalars.jsonl'  # every scalar logged (train/*, val/*, perf/*) with its step and the run's wall time
WANDB_RUN_FILE = 'wandb_run_id'  # the Weights & Biases run a resumed run goes on logging to

# Dense (not 2:4-sparse) bf16 peak FLOP/s per device (per chip; per GPU), from the vendors' data sheets.
# Keys are prefixes of jax's device_kind; the longest that matches wins ('NVIDIA H100 PCIe' over 'NVIDIA H100').
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5': 459e12,  # v5p
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU7x': 2307e12,  # Ironwood
    'NVIDIA A100': 312e12,  # SXM and PCIe alike
    'NVIDIA H100': 989e12,  # SXM ('NVIDIA H100 80GB HBM3')
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA GH200': 989e12,
    'NVIDIA H200': 989e12,  # SXM
    'NVIDIA H200 NVL': 835e12,
    'NVIDIA B200': 2250e12,  # HGX (1,000 W)
    'NVIDIA GB200': 2500e12,
}


def data_sheet_peak(device_kind: str) -> float | None:
  names = [name for name in PEAK_FLOPS if device_kind.startswith(name)]
  return PEAK_FLOPS[max(names, key=len)] if names else None


def measure_matmul_flops(dtype, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 matmul in `dtype` on the default device."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def measured_peak_per_device(matmul_flops: float, platform: str, local_devices: int) -> float:
  """One device's matmul rate as the peak of each device.

  Fake CPU devices (--xla_force_host_platform_device_count) share the host's cores, so each gets
  its share; an accelerator's matmul ran on that accelerator alone, so it is that device's peak.
  """
  return matmul_flops / local_devices if platform == 'cpu' else matmul_flops


def peak_flops_per_device(configured: float) -> tuple[float, str]:
  """The peak used for MFU and where it came from."""
  if configured > 0:
    return configured, 'config'
  device = jax.devices()[0]
  known = data_sheet_peak(device.device_kind)
  if known:
    return known, device.device_kind
  # CPU (float32 matmuls are its fastest) or an accelerator missing from the table (bf16, as the model computes).
  dtype = jnp.float32 if device.platform == 'cpu' else jnp.bfloat16
  measured = measured_peak_per_device(measure_matmul_flops(dtype), device.platform, jax.local_device_count())
  return measured, f'measured {device.device_kind} matmul'


def model_flops_utilization(flops_per_token: float, tokens_per_sec: float, peak_per_device: float,
                            num_devices: int) -> float:
  """MFU: the model's FLOP/s over the peak of every device the step runs on."""
  return flops_per_token * tokens_per_sec / (peak_per_device * num_devices)


def tokens_per_second_at(mfu: float, flops_per_token: float, peak_per_device: float, num_devices: int) -> float:
  """The throughput that reaches `mfu`: model_flops_utilization, which is linear in tokens/s, solved for them."""
  return mfu / model_flops_utilization(flops_per_token, 1.0, peak_per_device, num_devices)


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


class _BucketEventsFile:
  """An events file in a bucket, for tensorboardX: kept in memory and written whole, through epath, at each
  flush, since a bucket's objects cannot be appended to. (tensorboardX's own gs:// writer uploads again when
  garbage-collected, and so can stall a process's exit for minutes when the storage has gone.)"""

  def __init__(self, url: str):
    self._path, self._data = paths.path(url), bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._data))

  def close(self) -> None:
    self.flush()


class _BucketEventsFiles:
  """What tensorboardX asks for a URL's events file (record_writer.register_writer_factory)."""

  def open(self, url: str) -> _BucketEventsFile:
    return _BucketEventsFile(url)

  def directory_check(self, url: str) -> None:
    del url  # a bucket has no directories to create


def _tensorboardx():
  """tensorboardX's writer, imported here: only process 0 writes logs.

  tensorboardX imports torch whenever it is installed (to accept torch tensors, which jaxgpt never
  passes): a second of every command's start-up. Unless torch is already imported, it is hidden for
  that import alone, and importable as usual afterwards.
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter, record_writer
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter, record_writer


class MetricWriter:
  """Console lines and scalars, written by process 0 only: to TensorBoard in `workdir` (a local directory or a
  bucket); once `start_history` is called, to its scalars.jsonl; and to Weights & Biases when
  `config.train.wandb_project` is set."""

  def __init__(self, workdir: str | None, config=None):
    self._active = jax.process_index() == 0
    self._workdir = workdir
    self._tb = self._history = self._wandb = None
    self._started, self._seconds_before = time.perf_counter(), 0.0
    project = config.train.wandb_project if config is not None else ''
    if project:  # on every process: a missing package fails everywhere, before the data is prepared
      require_extra('wandb', 'wandb')
    if self._active and workdir:
      SummaryWriter, record_writer = _tensorboardx()
      for scheme in paths.REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.removesuffix('://'), _BucketEventsFiles())
      self._tb = SummaryWriter(logdir=str(paths.path(workdir) / 'tensorboard'))
      if project:
        self._wandb = _start_wandb(workdir, project, config)

  def start_history(self, resumed_at: int) -> None:
    """Starts writing scalars.jsonl, cut back to step `resumed_at`. Its wall time runs from this writer's
    start (data preparation included) on from the last kept record's, so that a resumed run's time counts
    the time before it."""
    if self._active and self._workdir:
      self._history = _JsonLines(paths.path(self._workdir) / SCALARS_FILE, resumed_at)
      self._seconds_before = self._history.last.get('seconds', 0.0)

  def log(self, message: str) -> None:
    if self._active:
      print(message, flush=True)

  def scalars(self, step: int, values: dict) -> None:
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()
    if self._history is not None:
      seconds = self._seconds_before + time.perf_counter() - self._started
      self._history.append([{'step': step, 'seconds': round(seconds, 3), **values}])
    if self._wandb is not None:
      self._wandb.log(values, step=step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _start_wandb(workdir: str, project: str, config):
  """A Weights & Biases run named after the workdir; a resumed run goes on logging to the same one.

  W&B keeps the first value logged at a step: the steps a killed run logged past its last checkpoint keep
  their old values there (scalars.jsonl and metrics.jsonl are cut back and hold the resumed run's).
  """
  import wandb
  id_file = paths.path(workdir) / WANDB_RUN_FILE
  run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
  id_file.write_text(run_id)
  local = None if paths.is_remote(workdir) else str(paths.path(workdir))  # W&B's own files: a local directory
  return wandb.init(project=project, name=paths.path(workdir).name, id=run_id, resume='allow',
                    config=config.to_dict(), dir=local)


class StepMetrics:
  """The train step's metrics on their way from the device to the logs and `metrics.jsonl`.

  They stay on the device until `pull`, which the loop calls only where it waits for the device
  anyway (log steps, saves): pulling after every step would stall the dispatch of the next one.
  Each pulled step is appended to `metrics.jsonl` (one JSON object per step, process 0 only) and
  checked for an update the train step skipped because something in it was not finite.
  """

  def __init__(self, path: str, resumed_at: int, on_nonfinite: str, log):
    self._file = _JsonLines(path, resumed_at) if jax.process_index() == 0 else None
    self._on_nonfinite = on_nonfinite
    self._log = log
    self._on_device = []  # (step, metrics) not yet pulled
    self._pulled = []  # records pulled since the last `take`
    self.skipped = 0  # updates skipped by this process's run

  def add(self, step: int, metrics: dict) -> None:
    self._on_device.append((step, metrics))

  def pull(self) -> None:
    """Brings the pending steps to the host; in 'stop' mode, raises at a skipped one."""
    records = [{'step': step, **{k: float(v) for k, v in m.items() if k != 'finite'},
                **({} if m['finite'] else {'skipped': True})}
               for step, m in jax.device_get(self._on_device)]
    self._on_device = []
    self._pulled += records
    if self._file:
      self._file.append(records)
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


class _JsonLines:
  """A run's JSON-lines file, one record per line, each with its `step`, appended to as the run goes.

  Opening it cuts it back to `resumed_at`: the records a killed run wrote past its last checkpoint go (and a
  line it left half-written), so that the file lists each step once. A bucket's objects cannot be appended to:
  there the file is kept in memory and written whole at each append.
  """

  def __init__(self, path, resumed_at: int):
    self._path = paths.path(path)
    self._lines = []
    if self._path.exists():
      self._lines = _records_up_to(self._path, resumed_at)
      self._path.write_text(''.join(self._lines))
    self.last = json.loads(self._lines[-1]) if self._lines else {}  # the last record kept

  def append(self, records: list[dict]) -> None:
    lines = [json.dumps(r) + '\n' for r in records]
    if paths.is_remote(self._path):
      self._lines += lines
      self._path.write_text(''.join(self._lines))
    else:
      with self._path.open('a') as f:
        f.writelines(lines)


def read_records(path) -> list[dict]:
  """The records of a run's JSON-lines file ([] when it has none); a line left half-written is left out."""
  path = paths.path(path)
  return [json.loads(line) for line in _records_up_to(path, float('inf'))] if path.exists() else []


def _records_up_to(path, step: int) -> list[str]:
  """The file's lines without the records a killed run wrote past its last checkpoint (nor a line it left
  half-written)."""
  kept = []
  for line in path.read_text().splitlines(keepends=True):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record['step'] <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  return kept
