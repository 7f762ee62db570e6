"""Watching a served model: Prometheus metrics (`GET /metrics`) and an audit log of flagged prompts and outputs.

The metrics, in their own registry (prometheus-client), so that several servers in one process do not mix:
- `jaxgpt_requests_total{endpoint, status}` and `jaxgpt_request_seconds{endpoint}` (arrival to the last byte
  sent, a stream included), counted for every HTTP request by `RequestMetrics`, refused ones too;
- `jaxgpt_prompt_tokens_total` and `jaxgpt_generated_tokens_total{endpoint}`;
- `jaxgpt_safety_flags_total{text, kind, action}`: flagged prompts and outputs, by what flagged them
  (a blocked word, else the classifier) and what the server did;
- `jaxgpt_queue_depth`: rows (a prompt's choice each) waiting to be decoded.

The audit log is JSON Lines, one object per flagged prompt or output: time, request id, endpoint, choice,
the end user the client named, the action, the checker's scores and the text. It is appended to a local
file and flushed line by line, so lines written before a crash stay. A bucket cannot be appended to
(an object is written whole), so a gs:// path is refused: write the log on the server's disk and ship it
with the host's log agent. A failed write is logged and counted (`jaxgpt_audit_log_errors_total`); the
request it belongs to is answered all the same.
"""

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.safety import SafetyFlags

log = logging.getLogger('jaxgpt.serve')

# Seconds: a short completion takes tens of milliseconds, a long one on a big model minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Monitor:
  """The server's metrics and audit log. `queue_depth` is read at each scrape."""

  def __init__(self, queue_depth: Callable[[], int], audit_log: str = ''):
    self.registry = registry = CollectorRegistry()
    self.requests = Counter('jaxgpt_requests', 'HTTP requests answered, by endpoint and status code.',
                            ['endpoint', 'status'], registry=registry)
    self.latency = Histogram('jaxgpt_request_seconds', 'Seconds from a request to the last byte of its answer.',
                             ['endpoint'], buckets=LATENCY_BUCKETS, registry=registry)
    self.prompt_tokens = Counter('jaxgpt_prompt_tokens', 'Prompt tokens of the requests decoded, by endpoint.',
                                 ['endpoint'], registry=registry)
    self.generated_tokens = Counter('jaxgpt_generated_tokens', 'Tokens generated, by endpoint.', ['endpoint'],
                                    registry=registry)
    self.flags = Counter('jaxgpt_safety_flags', 'Flagged texts: prompt or output, what flagged it, the action taken.',
                         ['text', 'kind', 'action'], registry=registry)
    Gauge('jaxgpt_queue_depth', 'Rows (one choice of one prompt each) waiting to be decoded.',
          registry=registry).set_function(queue_depth)
    self.audit_errors = Counter('jaxgpt_audit_log_errors', 'Audit log lines that could not be written.',
                                registry=registry)
    self._audit, self._lock = _open_audit_log(audit_log) if audit_log else None, threading.Lock()

  def flagged(self, text_kind: str, flags: SafetyFlags, action: str, text: str, *, request_id: str, endpoint: str,
              choice: int | None = None, user: str | None = None) -> None:
    """Counts a flagged prompt or output (`text_kind`) and writes it to the audit log."""
    kind = 'blocked_word' if flags.words else 'classifier'
    self.flags.labels(text_kind, kind, action).inc()
    log.warning('flagged %s in %s (%s): %s', text_kind, request_id, action, flags.reason())
    if self._audit is None:
      return
    record = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds'),
              'request_id': request_id, 'endpoint': endpoint, 'text_kind': text_kind, 'choice': choice,
              'user': user, 'action': action, 'flagged_by': kind, 'words': list(flags.words), 'score': flags.score,
              'flagged_fraction': flags.flagged_fraction, 'flagged_lines': list(flags.flagged_lines), 'text': text}
    try:
      with self._lock:
        self._audit.write(json.dumps(record, ensure_ascii=False) + '\n')
        self._audit.flush()
    except OSError:
      self.audit_errors.inc()
      log.exception('cannot write the audit log line of %s', request_id)

  def close(self) -> None:
    if self._audit is not None:
      self._audit.close()


def _open_audit_log(location: str):
  if paths.is_remote(location):
    raise JaxgptError(f'--audit_log={location}: the audit log is appended to line by line, and a bucket object '
                      'cannot be appended to. Give a path on this machine and ship the file with your log agent '
                      '(docs/serving.md).')
  path = paths.path(location)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, 'a', encoding='utf-8')
  except OSError as e:
    raise JaxgptError(f'cannot open the audit log --audit_log={location} for appending ({e.strerror}).') from None


class RequestMetrics:
  """ASGI middleware: counts each HTTP request by endpoint and status, and times it to its last byte."""

  def __init__(self, app, monitor: Monitor, endpoints: set[str]):
    self.app, self.monitor, self.endpoints = app, monitor, endpoints

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    endpoint = scope['path'] if scope['path'] in self.endpoints else 'other'  # bounded label values
    start, status = time.perf_counter(), 500

    async def sending(message):
      nonlocal status
      if message['type'] == 'http.response.start':
        status = message['status']
      await send(message)

    try:
      await self.app(scope, receive, sending)
    finally:
      self.monitor.requests.labels(endpoint, str(status)).inc()
      self.monitor.latency.labels(endpoint).observe(time.perf_counter() - start)
