"""The server's decode engine: one worker thread that owns the model and decodes queued rows in batches.

The model's weights and KV cache are sharded over a mesh of this machine's devices (`--mesh.*`,
docs/sharding.md). Rows (one choice of one prompt each) wait in a bounded queue and are decoded
together in batches of up to `max_batch`, each row with its own settings (`jaxgpt.sample.stream_text`).
The batch is always padded to `max_batch` rows so shapes, and so compilations, do not depend on how many
rows arrived together. A failure answers its batch's rows and the worker goes on.
"""

import asyncio
import dataclasses
import logging
import queue
import threading

from jaxgpt import inference
from jaxgpt.sample import Sampling, stream_text
from jaxgpt.serve_api import RequestError

log = logging.getLogger('jaxgpt.serve')


@dataclasses.dataclass
class Job:
  """One row in flight: the worker puts (index, TextContinuation or exception) on `events`, in `loop`'s thread."""
  index: int  # the choice this row is, in its request
  prompt: list[int]  # token ids, BOS first
  sampling: Sampling
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue  # shared by a request's rows

  def send(self, event) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


class Engine:
  """The model behind a bounded queue, decoded on its mesh in batches by one worker thread."""

  def __init__(self, loaded: inference.Loaded, tokenizer, *, max_batch: int, queue_size: int, chunk_tokens: int):
    self.loaded, self.model, self.params, self.tokenizer = loaded, loaded.model, loaded.params, tokenizer
    self.max_batch, self.queue_size, self.chunk_tokens = max_batch, queue_size, chunk_tokens
    self._jobs = queue.Queue(maxsize=queue_size)
    self._submitting = threading.Lock()
    threading.Thread(target=self._work, daemon=True, name='jaxgpt-decode').start()

  def waiting(self) -> int:
    return self._jobs.qsize()

  def submit(self, jobs: list[Job]) -> None:
    """Queues a request's rows, all or none: a request is never half decoded."""
    with self._submitting:  # the worker only takes rows out, so the room seen here stays
      if self._jobs.qsize() + len(jobs) > self.queue_size:
        raise RequestError(503, 'the server is busy: too many requests are waiting. Retry shortly.')
      for job in jobs:
        self._jobs.put_nowait(job)

  def _work(self) -> None:
    with self.loaded.activation_rules():  # the mesh in use is set per thread
      while True:
        batch = [self._jobs.get()]
        while len(batch) < self.max_batch and not self._jobs.empty():
          batch.append(self._jobs.get_nowait())
        try:
          self._decode(batch)
        except Exception as e:  # a failure answers this batch's rows and keeps the server up
          log.exception('decoding failed')
          for job in batch:
            job.send(e)

  def _decode(self, batch: list[Job]) -> None:
    # Padding rows (one BOS, one token) keep the batch shape fixed; they finish at once.
    padding = self.max_batch - len(batch)
    prompts = [job.prompt for job in batch] + [[self.tokenizer.bos_id]] * padding
    samplings = [job.sampling for job in batch] + [Sampling(max_new_tokens=1)] * padding
    for deltas in stream_text(self.model, self.params, self.tokenizer, prompts, samplings, chunk=self.chunk_tokens):
      for job, delta in zip(batch, deltas):
        if delta.text or delta.finish_reason or delta.logprobs or delta.prompt_logprobs:
          job.send(delta)
