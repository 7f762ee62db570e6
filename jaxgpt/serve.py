"""HTTP serving of a trained run: `python -m jaxgpt.serve --workdir DIR [--port 8000]` (docs/serving.md).

FastAPI on uvicorn, bound to 127.0.0.1 unless told otherwise, in OpenAI's shapes (`jaxgpt.serve_api`):
- `POST /v1/completions`: one prompt or a list, `n` choices each, log-probs, echo, stop, seed, streaming;
- `POST /v1/chat/completions`: messages rendered with the run's own chat template (data.template, as
  training renders them), the reply ending at the template's end marker;
- `GET /v1/models` (the served model's name, size and context), `GET /health`, and `GET /metrics`
  (Prometheus, `jaxgpt.serving_metrics`).

Every field of a request is checked before it is queued (the pydantic models, then the context length
here): a bad request gets its own 400 in OpenAI's error shape and never reaches a batch of other requests.
A model name other than the served one gets 404; a request without a seed a fresh random sample.

One worker thread owns the model (`jaxgpt.serving_engine`). Each choice of each prompt is a row; a
request's rows are queued together (no room for all: 503) and decoded in batches with other requests'.

Prompts and outputs go through the same `jaxgpt.safety.SafetyChecker` as the data pipeline. Every choice
carries its flags; with `--safety=block` a flagged prompt is refused (400) and a flagged output withheld
(finish_reason 'content_filter'). Flagged texts are counted in /metrics and written to `--audit_log`.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import secrets
import socket
import uuid

import ml_collections
from absl import flags

from jaxgpt import inference, paths, run_dir
from jaxgpt.config import JaxgptError, base_config, require_extra, run_cli
from jaxgpt.data import instructions
from jaxgpt.model import num_params
from jaxgpt.safety import SafetyChecker, SafetyFlags
from jaxgpt.sample import DEFAULT_MAX_NEW_TOKENS, SEED_LIMIT, Sampling, TextContinuation, encode_prompt
from jaxgpt.serve_api import (ChatRequest, CompletionRequest, RequestError, bounded, body, chat_logprobs,
                              completion_logprobs, invalid_request, usage)
from jaxgpt.serving_engine import Engine, Job
from jaxgpt.serving_metrics import Monitor, RequestMetrics

log = logging.getLogger('jaxgpt.serve')
COMPLETIONS, CHAT = '/v1/completions', '/v1/chat/completions'


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str  # what the safety checker reads, and echo sends back
  ids: list[int]  # what the model continues


@dataclasses.dataclass
class Choice:
  """One choice as its pieces arrive: the text, log-probs and tokens so far, its flags and how it ended."""
  index: int
  prompt: Prompt
  prompt_flags: SafetyFlags
  echo: bool = False
  text: str = ''
  logprobs: list | None = None
  num_tokens: int = 0
  finish_reason: str | None = None
  output_flags: SafetyFlags | None = None
  started: bool = False  # a piece has arrived

  def add(self, delta: TextContinuation) -> tuple[str, list | None]:
    """The piece of text `delta` adds (after the prompt, the first time, with echo) and its log-probs."""
    piece, entries = delta.text, delta.logprobs
    if self.echo and not self.started:
      piece = self.prompt.text + piece
      entries = None if entries is None else (delta.prompt_logprobs or []) + entries
    self.started = True
    self.text += piece
    if entries is not None:
      self.logprobs = (self.logprobs or []) + entries
    self.num_tokens, self.finish_reason = delta.num_tokens, delta.finish_reason
    return piece, entries


class Service:
  """The checks (API key, model name, context, safety) and the rows of each request, around an Engine."""

  def __init__(self, engine: Engine, checker: SafetyChecker, monitor: Monitor, *, safety_mode: str,
               model_name: str, step: int, template=None, api_key: str = ''):
    self.engine, self.checker, self.monitor, self.safety_mode = engine, checker, monitor, safety_mode
    self.model_name, self.step, self.api_key = model_name, step, api_key
    self.tokenizer, self.max_len = engine.tokenizer, engine.model.cfg.max_len
    self.chat_format = ml_collections.ConfigDict({'format': 'chat',
                                                  'template': template or base_config().data.template})
    self.end_marker = self.chat_format.template.end.strip() or self.chat_format.template.end

  def authorize(self, header: str | None) -> None:
    if self.api_key and not hmac.compare_digest(header or '', f'Bearer {self.api_key}'):
      raise RequestError(401, 'missing or wrong API key: send the header "Authorization: Bearer <key>".',
                         code='invalid_api_key')

  def chat_prompt(self, messages: list[dict]) -> Prompt:
    """The conversation as training renders it (jaxgpt.data.instructions), up to where the reply begins."""
    reply = {'role': 'assistant', 'content': 'reply'}  # rendered, then cut off: only its opening stays
    text, problem = instructions.render({'messages': [*messages, reply]}, self.chat_format)
    if problem:
      raise RequestError(400, f'"messages" cannot be rendered with the chat template: {problem}.', param='messages')
    ids, _ = instructions.encode(self.tokenizer, [text[:text.rindex(instructions.RESPONSE_START)]])[0]
    return Prompt('\n'.join(m['content'] for m in messages), ids[:-1].tolist())  # without the closing EOS

  def start(self, request, prompts: list[Prompt], endpoint: str, request_id: str, *, max_tokens: int | None,
            stop: tuple[str, ...], logprobs: int | None, echo: bool = False) -> tuple[list[Choice], asyncio.Queue]:
    """Checks a request's prompts and queues its rows: `n` choices of each prompt, in OpenAI's order."""
    if request.model not in (None, self.model_name):
      raise RequestError(404, f'model {request.model!r} is not served here: this server serves '
                              f'{self.model_name!r} (GET /v1/models).', param='model', code='model_not_found')
    request.check()
    rows = len(prompts) * request.n
    if rows > self.engine.queue_size:
      raise RequestError(400, f'{len(prompts)} prompt(s) x n={request.n} is {rows} completions; this server takes '
                              f'at most {self.engine.queue_size} in one request.', param='n')
    if max_tokens is None:  # chat's default: as many as fit, up to the commands' default
      max_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS, self.max_len - max(len(p.ids) for p in prompts)))
    field = 'prompt' if endpoint == COMPLETIONS else 'messages'
    for prompt in prompts:
      if len(prompt.ids) + max_tokens > self.max_len:
        raise RequestError(400, f'the prompt is {len(prompt.ids)} tokens and max_tokens is {max_tokens}: together '
                                f'they exceed the model\'s context of {self.max_len} tokens. Shorten the prompt or '
                                'ask for fewer tokens.', param=field, code='context_length_exceeded')
    prompt_flags = [self.checker.check(p.text) for p in prompts]
    for prompt, flagged in zip(prompts, prompt_flags):
      if flagged.profane:
        block = self.safety_mode == 'block'
        self.monitor.flagged('prompt', flagged, 'refused' if block else 'flagged', prompt.text, endpoint=endpoint,
                             request_id=request_id, user=request.end_user)
        if block:
          raise RequestError(400, f'the prompt was flagged by the safety checker ({_describe(flagged)}) and this '
                                  'server blocks flagged prompts.', param=field, code='content_filter')
    events, loop = asyncio.Queue(), asyncio.get_running_loop()
    choices, jobs = [], []
    for prompt, flagged in zip(prompts, prompt_flags):
      for _ in range(request.n):
        # Choice i of a seeded request is seed + i: reproducible, and no two choices share their random draws.
        seed = secrets.randbelow(SEED_LIMIT) if request.seed is None else (request.seed + len(choices)) % SEED_LIMIT
        sampling = Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_k=request.top_k,
                            top_p=request.top_p, seed=seed, stop=stop, logprobs=logprobs,
                            prompt_logprobs=echo and logprobs is not None)
        choices.append(Choice(len(choices), prompt, flagged, echo))
        jobs.append(Job(choices[-1].index, prompt.ids, sampling, loop, events))
    self.engine.submit(jobs)
    self.monitor.prompt_tokens.labels(endpoint).inc(sum(len(p.ids) for p in prompts))
    return choices, events

  def check_output(self, choice: Choice, text: str, request_id: str, endpoint: str, user: str | None, *,
                   final: bool) -> bool:
    """Whether `text` (a choice's output so far, or all of it when `final`) is withheld; its flags go on `choice`."""
    flagged = self.checker.check(text)
    withheld = flagged.profane and self.safety_mode == 'block'
    if final or withheld:
      choice.output_flags = flagged
    if flagged.profane and (final or withheld):
      self.monitor.flagged('output', flagged, 'withheld' if withheld else 'flagged', text, request_id=request_id,
                           endpoint=endpoint, choice=choice.index, user=user)
    return withheld

  def finished(self, choice: Choice, endpoint: str) -> None:
    self.monitor.generated_tokens.labels(endpoint).inc(choice.num_tokens)

  def safety(self, choice: Choice) -> dict:
    output = None if choice.output_flags is None else dataclasses.asdict(choice.output_flags)
    return {'mode': self.safety_mode, 'prompt': dataclasses.asdict(choice.prompt_flags), 'output': output}

  def info(self) -> dict:
    cfg = self.engine.model.cfg
    return {'object': 'list', 'data': [{
        'id': self.model_name, 'object': 'model', 'owned_by': 'jaxgpt', 'step': self.step,
        'parameters': num_params(self.engine.params), 'context_length': cfg.max_len,
        'vocab_size': cfg.vocab_size, 'architecture': dataclasses.asdict(cfg)}]}


async def _deltas(events: asyncio.Queue, rows: int):
  """(choice index, TextContinuation) as the engine sends them, until every row has finished."""
  while rows:
    index, delta = await events.get()
    if isinstance(delta, Exception):
      raise delta
    rows -= delta.finish_reason is not None
    yield index, delta


def create_app(service: Service):
  """The FastAPI app: the routes, each a thin layer over `service`, counted by RequestMetrics."""
  from fastapi import Depends, FastAPI, Header
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, Response, StreamingResponse
  from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

  completion_model, chat_model = bounded(CompletionRequest, service.max_len), bounded(ChatRequest, service.max_len)
  # A body without a Content-Type header is read as JSON too: JSON is the only body this API takes.
  app = FastAPI(title='jaxgpt', docs_url=None, redoc_url=None, strict_content_type=False)
  app.add_middleware(RequestMetrics, monitor=service.monitor,
                     endpoints={COMPLETIONS, CHAT, '/v1/models', '/health', '/metrics'})

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
    model = chat_model if http_request.url.path == CHAT else completion_model
    return error(invalid_request(model, e.errors(), e.body))

  def authorized(authorization: str | None = Header(None)) -> None:
    service.authorize(authorization)

  @app.get('/health')
  def health():
    return {'status': 'ok', 'model': service.model_name, 'step': service.step}

  @app.get('/v1/models')
  def models():
    return service.info()

  @app.get('/metrics')
  def metrics():
    return Response(generate_latest(service.monitor.registry), media_type=CONTENT_TYPE_LATEST)

  @app.post(COMPLETIONS, dependencies=[Depends(authorized)])
  async def completions(request: completion_model):
    prompts = [Prompt(text, encode_prompt(service.tokenizer, text)) for text in request.prompts]
    return await _answer(request, COMPLETIONS, f'cmpl-{uuid.uuid4().hex[:24]}', prompts,
                         max_tokens=request.max_tokens or 16, stop=request.stop_sequences, logprobs=request.logprobs,
                         echo=request.echo)

  @app.post(CHAT, dependencies=[Depends(authorized)])
  async def chat_completions(request: chat_model):
    top = request.top_logprobs or 0
    return await _answer(request, CHAT, f'chatcmpl-{uuid.uuid4().hex[:24]}',
                         [service.chat_prompt(request.messages)], max_tokens=request.new_tokens,
                         stop=(*request.stop_sequences, service.end_marker), logprobs=top if request.logprobs else None)

  async def _answer(request, endpoint: str, request_id: str, prompts: list[Prompt], **settings):
    choices, events = service.start(request, prompts, endpoint, request_id, **settings)
    prompt_tokens = sum(len(p.ids) for p in prompts)
    if request.stream:
      return StreamingResponse(_stream(service, request, endpoint, request_id, choices, events, prompt_tokens),
                               media_type='text/event-stream')
    try:
      async for index, delta in _deltas(events, len(choices)):
        choices[index].add(delta)
    except Exception as e:
      raise RequestError(500, f'decoding failed: {e}') from e
    for choice in choices:
      service.finished(choice, endpoint)
      if service.check_output(choice, choice.text, request_id, endpoint, request.end_user, final=True):
        choice.text, choice.logprobs, choice.finish_reason = '', None, 'content_filter'
    answers = [_choice(service, endpoint, c, c.text, c.logprobs, c.finish_reason, offset=0) for c in choices]
    kind = 'chat.completion' if endpoint == CHAT else 'text_completion'
    return body(kind, request_id, service.model_name, answers,
                usage(prompt_tokens, sum(c.num_tokens for c in choices)))

  return app


def _choice(service: Service, endpoint: str, choice: Choice, text: str, logprobs: list | None, finish_reason,
            *, offset: int, chunk: bool = False, first: bool = False) -> dict:
  """A choice in OpenAI's shape for `endpoint`, whole or (`chunk`) one piece of it; the safety flags beside it."""
  if endpoint == COMPLETIONS:
    shaped = {'text': text, 'index': choice.index,
              'logprobs': None if logprobs is None else completion_logprobs(logprobs, offset)}
  else:
    message = ({'role': 'assistant'} if first or not chunk else {}) | ({'content': text} if text or not chunk else {})
    shaped = {'index': choice.index, 'delta' if chunk else 'message': message,
              'logprobs': None if logprobs is None else chat_logprobs(logprobs)}
  return {**shaped, 'finish_reason': finish_reason, 'safety': service.safety(choice)}


async def _stream(service: Service, request, endpoint: str, request_id: str, choices: list[Choice], events,
                  prompt_tokens: int):
  """Server-sent events: one per piece of a choice's text, its last with the finish reason and output flags.

  In block mode the choice's text so far is checked before each piece is sent, so a flagged output
  stops that choice (finish_reason 'content_filter'); the other choices go on.
  """
  kind = 'chat.completion.chunk' if endpoint == CHAT else 'text_completion'
  opened, stopped = set(), set()  # choices with a chunk sent; choices withheld
  async for index, delta in _deltas(events, len(choices)):
    choice = choices[index]
    if index in stopped:
      continue
    offset = len(choice.text)
    piece, logprobs = choice.add(delta)
    finished = delta.finish_reason is not None
    withheld = ((service.safety_mode == 'block' or finished) and (piece or finished) and
                service.check_output(choice, choice.text, request_id, endpoint, request.end_user, final=finished))
    if withheld:
      stopped.add(index)
      piece, logprobs, delta.finish_reason = '', None, 'content_filter'
    if withheld or finished:
      service.finished(choice, endpoint)
    elif not (piece or logprobs):
      continue
    answer = _choice(service, endpoint, choice, piece, logprobs, delta.finish_reason, offset=offset, chunk=True,
                     first=index not in opened)
    opened.add(index)
    yield _event(body(kind, request_id, service.model_name, [answer]))
  if request.stream_options is not None and request.stream_options.include_usage:
    yield _event(body(kind, request_id, service.model_name, [],
                      usage(prompt_tokens, sum(c.num_tokens for c in choices))))
  yield 'data: [DONE]\n\n'


def _event(answer: dict) -> str:
  return f'data: {json.dumps(answer)}\n\n'


def _describe(safety_flags) -> str:
  return f'words: {", ".join(safety_flags.words)}' if safety_flags.words else f'score {safety_flags.score:.2f}'


# --- command line ---------------------------------------------------------

def _define_flags() -> None:
  # Defined only when this module runs as a command, so importing it adds no flags.
  flags.DEFINE_string('workdir', None, 'The run directory written by jaxgpt.train.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to serve (default: the latest).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 exposes the server to the network.')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('model_name', None, 'The name clients send as "model" (default: the workdir\'s last part).')
  flags.DEFINE_string('api_key_env', 'JAXGPT_API_KEY',
                      'Environment variable holding the API key clients must send; unset = no key needed.')
  flags.DEFINE_enum('safety', 'flag', ['flag', 'block'], "'flag': report flags only; 'block': refuse flagged text.")
  flags.DEFINE_float('classifier_threshold', 0.9, 'Profanity classifier probability that flags a line; 0 = off.')
  flags.DEFINE_list('blocked_words', [], 'Comma-separated words that flag a text.')
  flags.DEFINE_string('blocked_words_file', '', 'More such words, one per line.')
  flags.DEFINE_string('audit_log', '', 'JSONL file (on this machine) that flagged prompts and outputs are '
                      'appended to; empty = none.')
  flags.DEFINE_integer('max_batch', 8, 'Rows (choices) decoded together.')
  flags.DEFINE_integer('queue_size', 64, 'Rows that may wait; a request that does not fit is answered 503.')
  flags.DEFINE_integer('chunk_tokens', 8, 'Decode steps between streamed pieces.')
  inference.define_mesh_flags()


def _check_port_free(host: str, port: int) -> None:
  with socket.socket() as probe:
    # As uvicorn binds: a port whose last server has just stopped (connections in TIME_WAIT) is free.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((host, port))
    except OSError as e:
      raise JaxgptError(f'cannot listen on {host}:{port} ({e.strerror}). Another server may be using the port: '
                        'choose another --port, or stop that server.') from None


def build_service(workdir: str, loaded: inference.Loaded, config, tokenizer, *, checker: SafetyChecker,
                  safety_mode: str = 'flag', audit_log: str = '', model_name: str | None = None, api_key: str = '',
                  max_batch: int = 8, queue_size: int = 64, chunk_tokens: int = 8) -> Service:
  """The server's pieces for a loaded run: what `main` serves, and what tests serve in-process."""
  engine = Engine(loaded, tokenizer, max_batch=max_batch, queue_size=queue_size, chunk_tokens=chunk_tokens)
  monitor = Monitor(engine.waiting, audit_log)
  return Service(engine, checker, monitor, safety_mode=safety_mode, step=loaded.step,
                 model_name=model_name or paths.path(workdir).name, template=config.data.get('template'),
                 api_key=api_key)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise JaxgptError('--workdir is required: the run directory written by jaxgpt.train.')
  if FLAGS.max_batch < 1 or FLAGS.queue_size < 1 or FLAGS.chunk_tokens < 1:
    raise JaxgptError('--max_batch, --queue_size and --chunk_tokens must be positive.')
  require_extra('serve', 'fastapi', 'uvicorn', 'prometheus_client')
  _check_port_free(FLAGS.host, FLAGS.port)  # before minutes of loading, not after
  import uvicorn  # imported here: only the command needs the server libraries

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')
  config, tokenizer = run_dir.load_run(FLAGS.workdir)
  checker = SafetyChecker(ml_collections.ConfigDict({
      'classifier_threshold': FLAGS.classifier_threshold, 'blocked_words': FLAGS.blocked_words,
      'blocked_words_file': FLAGS.blocked_words_file}))
  if FLAGS.audit_log:
    Monitor(lambda: 0, FLAGS.audit_log).close()  # a log that cannot be written fails now, not after loading
  mesh = inference.make_mesh(inference.mesh_flags())
  loaded = inference.load(config, tokenizer, FLAGS.workdir, FLAGS.step, mesh=mesh, dtype=FLAGS.dtype)
  service = build_service(FLAGS.workdir, loaded, config, tokenizer, checker=checker, safety_mode=FLAGS.safety,
                          audit_log=FLAGS.audit_log, model_name=FLAGS.model_name,
                          api_key=os.environ.get(FLAGS.api_key_env, ''), max_batch=FLAGS.max_batch,
                          queue_size=FLAGS.queue_size, chunk_tokens=FLAGS.chunk_tokens)
  log.info('serving %s (step %d) as %r on a mesh of %s on http://%s:%d', FLAGS.workdir, loaded.step,
           service.model_name, dict(mesh.shape), FLAGS.host, FLAGS.port)
  uvicorn.run(create_app(service), host=FLAGS.host, port=FLAGS.port, log_level='warning')


def cli():
  _define_flags()
  run_cli(main)


if __name__ == '__main__':
  cli()
