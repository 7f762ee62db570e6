"""Stopping cleanly on SIGTERM (what a preempted VM or a cluster scheduler sends) and SIGINT (Ctrl-C).

A signal only sets a flag; after each step the training loop asks
`should_stop(step)`, and on True saves a checkpoint at that step and exits.

With several processes they must all save at the same step, yet a signal may
reach only one of them, or reach them at different steps. There JAX's
preemption service decides: it catches SIGTERM itself, tells every process
through jax.distributed's coordination service, and
`reached_preemption_sync_point` turns True on all of them at the same step
(one past the furthest step any process had reached). So on several processes
only SIGINT is handled here, by sending this process a SIGTERM for JAX to see.
"""

import os
import signal

import jax
from jax.experimental import multihost_utils


class StopSignals:
  """A context manager: inside it, SIGTERM and SIGINT ask the loop to stop instead of killing it."""

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self.received: str | None = None  # the first signal's name, in this process
    self._previous = {}

  def __enter__(self) -> 'StopSignals':
    watched = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
    self._previous = {signum: signal.signal(signum, self._on_signal) for signum in watched}
    return self

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.received = self.received or signal.Signals(signum).name
    # A second Ctrl-C acts as usual, for a run that must stop now rather than after a save.
    signal.signal(signum, self._previous[signum])
    if self._multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and stop. Call it after every step, on every process."""
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
