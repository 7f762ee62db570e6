"""Throughput and MFU, and the writers that put metrics on the console and in TensorBoard."""

import time

import jax
import jax.numpy as jnp

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


def measure_matmul_flops(n: int = 2048, repeats: int = 3) -> float:
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
