"""HTTP serving of a trained run: `python -m jaxgpt.serve --workdir DIR [--port 8000]`.

FastAPI on uvicorn, bound to 127.0.0.1 unless told otherwise:
- `POST /v1/completions`: the OpenAI completions shape (prompt, max_tokens,
  temperature, top_p, stop, seed, stream with server-sent events);
- `GET /health`, and `GET /v1/models` for the model's size and context.

Every field of a request is checked before it is queued (the pydantic model in
`jaxgpt.serve_api`, then the context length here): a bad request gets its own
400 in OpenAI's error shape and never reaches a batch of other requests.

One worker thread owns the model, its weights and KV cache sharded over a
mesh of this machine's devices (`--mesh.*`, docs/sharding.md). Requests wait in
a bounded queue (full: 503) and are decoded together in batches of up to
`max_batch` rows, each row with its own settings; the batch is always padded to
`max_batch` rows so shapes, and so compilations, do not depend on how many
requests arrived together.

Prompts and outputs go through the same `jaxgpt.safety.SafetyChecker` as the
data pipeline. Every response carries its flags; with `--safety=block` a
flagged prompt is refused (400) and a flagged output withheld
(finish_reason 'content_filter'). Flagged events are logged.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import queue
import socket
import threading
import uuid

import ml_collections
from absl import flags

from jaxgpt import inference, paths, run_dir
from jaxgpt.config import JaxgptError, require_extra, run_cli
from jaxgpt.model import num_params
from jaxgpt.safety import SafetyChecker
from jaxgpt.sample import Sampling, encode_prompt, stream_text
from jaxgpt.serve_api import CompletionRequest, RequestError, completion_body, completion_request, invalid_request

log = logging.getLogger('jaxgpt.serve')


@dataclasses.dataclass
class Job:
  """One completion request in flight: the worker puts deltas on `events` for the HTTP handler."""
  prompt: str
  sampling: Sampling
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

  def send(self, event) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
  """The model behind a bounded queue, decoded on its mesh in batches by one worker thread."""

  def __init__(self, loaded: inference.Loaded, tokenizer, *, max_batch: int, queue_size: int, chunk_tokens: int):
    self.loaded, self.model, self.params, self.tokenizer = loaded, loaded.model, loaded.params, tokenizer
    self.max_batch, self.chunk_tokens = max_batch, chunk_tokens
    self._jobs = queue.Queue(maxsize=queue_size)
    threading.Thread(target=self._work, daemon=True, name='jaxgpt-decode').start()

  def submit(self, job: Job) -> None:
    try:
      self._jobs.put_nowait(job)
    except queue.Full:
      raise RequestError(503, 'the server is busy: too many requests are waiting. Retry shortly.') from None

  def _work(self) -> None:
    with self.loaded.activation_rules():  # the mesh in use is set per thread
      while True:
        batch = [self._jobs.get()]
        while len(batch) < self.max_batch and not self._jobs.empty():
          batch.append(self._jobs.get_nowait())
        try:
          self._decode(batch)
        except Exception as e:  # a failure answers this batch's requests and keeps the server up
          log.exception('decoding failed')
          for job in batch:
            job.send(e)

  def _decode(self, batch: list[Job]) -> None:
    # Padding rows (one BOS, one token) keep the batch shape fixed; they finish at once.
    padding = self.max_batch - len(batch)
    prompts = [job.prompt for job in batch] + [''] * padding
    samplings = [job.sampling for job in batch] + [Sampling(max_new_tokens=1)] * padding
    for deltas in stream_text(self.model, self.params, self.tokenizer, prompts, samplings, chunk=self.chunk_tokens):
      for job, delta in zip(batch, deltas):
        if delta.text or delta.finish_reason:
          job.send(delta)


def _flags_json(safety_flags) -> dict:
  return dataclasses.asdict(safety_flags)


class Service:
  """The API key, the context and safety checks, and the response bodies, around an Engine."""

  def __init__(self, engine: Engine, checker: SafetyChecker, *, safety_mode: str, model_name: str, step: int,
               api_key: str = ''):
    self.engine, self.checker, self.safety_mode = engine, checker, safety_mode
    self.model_name, self.step, self.api_key = model_name, step, api_key
    self.max_len = engine.model.cfg.max_len

  def authorize(self, header: str | None) -> None:
    if self.api_key and not hmac.compare_digest(header or '', f'Bearer {self.api_key}'):
      raise RequestError(401, 'missing or wrong API key: send the header "Authorization: Bearer <key>".',
                         code='invalid_api_key')

  def sampling(self, request: CompletionRequest) -> tuple[Sampling, int]:
    """The request's settings and its prompt's length in tokens, once the two fit the context together."""
    prompt_tokens = len(encode_prompt(self.engine.tokenizer, request.prompt))
    if prompt_tokens + request.max_tokens > self.max_len:
      raise RequestError(400, f'the prompt is {prompt_tokens} tokens and max_tokens is {request.max_tokens}: '
                              f'together they exceed the model\'s context of {self.max_len} tokens. Shorten the '
                              'prompt or ask for fewer tokens.', param='prompt', code='context_length_exceeded')
    sampling = Sampling(max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                        seed=request.seed, stop=request.stop_sequences)
    return sampling, prompt_tokens

  def check(self, kind: str, text: str, request_id: str):
    """The safety flags of a prompt or output; flagged ones are logged."""
    result = self.checker.check(text)
    if result.profane:
      log.warning('flagged %s in %s (%s): words %s, score %.2f, line %r', kind, request_id, self.safety_mode,
                  list(result.words), result.score, result.line)
    return result

  def response(self, request_id: str, text: str, finish_reason, prompt_flags, output_flags=None,
               usage=None) -> dict:
    safety = {'mode': self.safety_mode, 'prompt': _flags_json(prompt_flags),
              'output': None if output_flags is None else _flags_json(output_flags)}
    return completion_body(request_id, self.model_name, text, finish_reason, safety, usage)

  def info(self) -> dict:
    cfg = self.engine.model.cfg
    return {'object': 'list', 'data': [{
        'id': self.model_name, 'object': 'model', 'owned_by': 'jaxgpt', 'step': self.step,
        'parameters': num_params(self.engine.params), 'context_length': cfg.max_len,
        'vocab_size': cfg.vocab_size, 'architecture': dataclasses.asdict(cfg)}]}


def create_app(service: Service):
  """The FastAPI app: the routes, each a thin layer over `service`."""
  from fastapi import Depends, FastAPI, Header
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, StreamingResponse

  request_model = completion_request(service.max_len)
  # A body without a Content-Type header is read as JSON too: JSON is the only body this API takes.
  app = FastAPI(title='jaxgpt', docs_url=None, redoc_url=None, strict_content_type=False)

  def error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestError)
  async def refused(_, e: RequestError):
    return error(e)

  @app.exception_handler(RequestValidationError)
  async def invalid(http_request, e: RequestValidationError):
    # FastAPI parses the JSON before it checks the key: a client without the key still learns only that.
    try:
      service.authorize(http_request.headers.get('authorization'))
    except RequestError as unauthorized:
      return error(unauthorized)
    return error(invalid_request(request_model, e.errors(), e.body))

  def authorized(authorization: str | None = Header(None)) -> None:
    service.authorize(authorization)

  @app.get('/health')
  def health():
    return {'status': 'ok', 'model': service.model_name, 'step': service.step}

  @app.get('/v1/models')
  def models():
    return service.info()

  @app.post('/v1/completions', dependencies=[Depends(authorized)])
  async def completions(request: request_model):
    request_id = f'cmpl-{uuid.uuid4().hex[:24]}'
    sampling, prompt_tokens = service.sampling(request)
    prompt_flags = service.check('prompt', request.prompt, request_id)
    if prompt_flags.profane and service.safety_mode == 'block':
      raise RequestError(400, f'the prompt was flagged by the safety checker ({_describe(prompt_flags)}) '
                              'and this server blocks flagged prompts.', param='prompt', code='content_filter')
    job = Job(request.prompt, sampling, asyncio.get_running_loop())
    service.engine.submit(job)

    async def deltas():
      while True:
        delta = await job.events.get()
        if isinstance(delta, Exception):
          raise delta
        yield delta
        if delta.finish_reason:
          return

    if request.stream:
      return StreamingResponse(_sse(service, request_id, prompt_flags, deltas()), media_type='text/event-stream')
    text, finish_reason, completion_tokens = '', None, 0
    try:
      async for delta in deltas():
        text, finish_reason, completion_tokens = text + delta.text, delta.finish_reason, delta.num_tokens
    except Exception as e:
      raise RequestError(500, f'decoding failed: {e}') from e
    output_flags = service.check('output', text, request_id)
    if output_flags.profane and service.safety_mode == 'block':
      text, finish_reason = '', 'content_filter'
    usage = {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
             'total_tokens': prompt_tokens + completion_tokens}
    return service.response(request_id, text, finish_reason, prompt_flags, output_flags, usage)

  return app


async def _sse(service: Service, request_id: str, prompt_flags, deltas):
  """Server-sent events: one per piece of text, the last with the finish reason and output flags.

  In block mode the text so far is checked before each piece is sent, so a
  flagged output stops the stream (finish_reason 'content_filter').
  """
  text = ''
  async for delta in deltas:
    output_flags = service.check('output', text + delta.text, request_id) if delta.text or delta.finish_reason else None
    if output_flags is not None and output_flags.profane and service.safety_mode == 'block':
      yield _event(service.response(request_id, '', 'content_filter', prompt_flags, output_flags))
      break
    text += delta.text
    finished = delta.finish_reason is not None
    yield _event(service.response(request_id, delta.text, delta.finish_reason, prompt_flags,
                                  output_flags if finished else None))
  yield 'data: [DONE]\n\n'


def _event(body: dict) -> str:
  return f'data: {json.dumps(body)}\n\n'


def _describe(safety_flags) -> str:
  return f'words: {", ".join(safety_flags.words)}' if safety_flags.words else f'score {safety_flags.score:.2f}'


# --- command line ---------------------------------------------------------

def _define_flags() -> None:
  # Defined only when this module runs as a command, so importing it adds no flags.
  flags.DEFINE_string('workdir', None, 'The run directory written by jaxgpt.train.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to serve (default: the latest).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 exposes the server to the network.')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('api_key_env', 'JAXGPT_API_KEY',
                      'Environment variable holding the API key clients must send; unset = no key needed.')
  flags.DEFINE_enum('safety', 'flag', ['flag', 'block'], "'flag': report flags only; 'block': refuse flagged text.")
  flags.DEFINE_float('classifier_threshold', 0.9, 'Profanity classifier probability that flags a line; 0 = off.')
  flags.DEFINE_list('blocked_words', [], 'Comma-separated words that flag a text.')
  flags.DEFINE_string('blocked_words_file', '', 'More such words, one per line.')
  flags.DEFINE_integer('max_batch', 8, 'Requests decoded together.')
  flags.DEFINE_integer('queue_size', 64, 'Requests that may wait; more are answered 503.')
  flags.DEFINE_integer('chunk_tokens', 8, 'Decode steps between streamed pieces.')
  inference.define_mesh_flags()


def _check_port_free(host: str, port: int) -> None:
  with socket.socket() as probe:
    try:
      probe.bind((host, port))
    except OSError as e:
      raise JaxgptError(f'cannot listen on {host}:{port} ({e.strerror}). Another server may be using the port: '
                        'choose another --port, or stop that server.') from None


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  if FLAGS.max_batch < 1 or FLAGS.queue_size < 1 or FLAGS.chunk_tokens < 1:
    raise JaxgptError('--max_batch, --queue_size and --chunk_tokens must be positive.')
  require_extra('serve', 'fastapi', 'uvicorn')
  _check_port_free(FLAGS.host, FLAGS.port)  # before minutes of loading, not after
  import uvicorn  # imported here: only the command needs the server libraries

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')
  config, tokenizer = run_dir.load_run(FLAGS.workdir)
  mesh = inference.make_mesh(inference.mesh_flags())
  loaded = inference.load(config, tokenizer, FLAGS.workdir, FLAGS.step, mesh=mesh, dtype=FLAGS.dtype)
  checker = SafetyChecker(ml_collections.ConfigDict({
      'classifier_threshold': FLAGS.classifier_threshold, 'blocked_words': FLAGS.blocked_words,
      'blocked_words_file': FLAGS.blocked_words_file}))
  engine = Engine(loaded, tokenizer, max_batch=FLAGS.max_batch, queue_size=FLAGS.queue_size,
                  chunk_tokens=FLAGS.chunk_tokens)
  service = Service(engine, checker, safety_mode=FLAGS.safety, step=loaded.step,
                    model_name=paths.path(FLAGS.workdir).name,
                    api_key=os.environ.get(FLAGS.api_key_env, ''))
  log.info('serving %s (step %d) on a mesh of %s on http://%s:%d', FLAGS.workdir, loaded.step, dict(mesh.shape),
           FLAGS.host, FLAGS.port)
  uvicorn.run(create_app(service), host=FLAGS.host, port=FLAGS.port, log_level='warning')


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
