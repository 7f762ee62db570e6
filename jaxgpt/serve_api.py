"""The HTTP API's shapes, as OpenAI's API has them: completions and chat completions, their chunks, and errors.

FastAPI validates a request against `CompletionRequest` or `ChatRequest`
before the handler runs, so a value that cannot be decoded is refused (400)
before it is queued with other requests. Each field's description is the rule
an invalid value is told, in one readable message: `'"max_tokens" must be an
integer from 1 to 63; got 500.'`.

No field is ignored: a field this server does not implement is refused (400,
naming it) unless it has the value that changes nothing (NEUTRAL_VALUES: what
some clients send by default), and a field sent as null is a field left out.
"""

import json
import time
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jaxgpt.sample import MAX_TOP_LOGPROBS, SEED_LIMIT, TextLogprob

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_CHOICES = 128  # `n`, as OpenAI's API; the server's queue bounds the rows of one request further
# OpenAI fields without an implementation here, and the one value of each that asks for nothing.
NEUTRAL_VALUES = {'frequency_penalty': 0, 'presence_penalty': 0, 'logit_bias': {}, 'best_of': 1, 'suffix': '',
                  'response_format': {'type': 'text'}, 'tools': [], 'tool_choice': 'none', 'store': False}
CHAT_ROLES = {'system': 'system', 'developer': 'system', 'user': 'user', 'assistant': 'assistant'}
_ERROR_TYPES = {401: 'authentication_error', 500: 'server_error', 503: 'server_busy'}
_NON_EMPTY = Annotated[StrictStr, Field(min_length=1)]


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra='forbid')
  include_usage: StrictBool = False  # a last chunk with the usage and no choices


class _Request(BaseModel):
  """The fields both endpoints share. Strict types: a number sent as a string is a mistake to report, not guess at."""
  model_config = ConfigDict(extra='forbid')

  model: StrictStr | None = Field(None, description='the name /v1/models lists')
  max_tokens: StrictInt | None = None  # bounded by the model's context in `bounded`
  temperature: float = Field(1.0, strict=True, ge=0, le=2, description='a number from 0 to 2')
  top_p: float = Field(1.0, strict=True, gt=0, le=1, description='a number in (0, 1]')
  top_k: StrictInt = Field(0, ge=0, description='a non-negative integer (0: no limit)')  # not OpenAI's; as vLLM's
  n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description=f'an integer from 1 to {MAX_CHOICES}')
  seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT, description=f'an integer from 0 to {SEED_LIMIT - 1}')
  stream: StrictBool = Field(False, description='true or false')
  stream_options: StreamOptions | None = Field(None, description='an object with "include_usage": true or false')
  stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
      None, description=f'a string or a list of at most {MAX_STOP_SEQUENCES} strings')
  user: StrictStr | None = Field(None, description='a string')  # who asked: written to the audit log
  safety_identifier: StrictStr | None = Field(None, description='a string')  # the same, by its newer name

  @model_validator(mode='before')
  @classmethod
  def _leave_out_nulls_and_neutral_values(cls, data: Any) -> Any:
    if not isinstance(data, dict):
      return data
    return {k: v for k, v in data.items() if v is not None and not (k in NEUTRAL_VALUES and v == NEUTRAL_VALUES[k])}

  @property
  def stop_sequences(self) -> tuple[str, ...]:
    stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
    return tuple(s for s in stops if s)

  @property
  def end_user(self) -> str | None:
    return self.safety_identifier or self.user

  def check(self) -> None:
    """The rules between fields, which pydantic checks one at a time."""
    if self.stream_options is not None and not self.stream:
      raise RequestError(400, '"stream_options" is only allowed with "stream": true.', param='stream_options')


class CompletionRequest(_Request):
  """The body of POST /v1/completions."""
  prompt: _NON_EMPTY | Annotated[list[_NON_EMPTY], Field(min_length=1)] = Field(
      description='a non-empty string or a non-empty list of them (prompts as token ids are not supported)')
  echo: StrictBool = Field(False, description='true or false')
  logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description=f'an integer from 0 to {MAX_TOP_LOGPROBS}')

  @property
  def prompts(self) -> list[str]:
    return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ChatRequest(_Request):
  """The body of POST /v1/chat/completions."""
  messages: list[Any] = Field(min_length=1, description='a non-empty list of {"role", "content"} objects')
  max_completion_tokens: StrictInt | None = None  # max_tokens' newer name; bounded in `bounded`
  logprobs: StrictBool = Field(False, description='true or false')
  top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                         description=f'an integer from 0 to {MAX_TOP_LOGPROBS}')

  @field_validator('messages')
  @classmethod
  def _messages(cls, messages: list) -> list[dict]:
    """Each message as {'role', 'content'} with the role the chat template has ('developer' is 'system')."""
    return [_message(i, m) for i, m in enumerate(messages)]

  @property
  def new_tokens(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

  def check(self) -> None:
    super().check()
    if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
      raise RequestError(400, '"max_tokens" and "max_completion_tokens" disagree: send one of them.',
                         param='max_completion_tokens')
    if self.top_logprobs is not None and not self.logprobs:
      raise RequestError(400, '"top_logprobs" needs "logprobs": true.', param='top_logprobs')


def _message(i: int, message) -> dict:
  where = f'messages[{i}]'
  if not isinstance(message, dict):
    raise PydanticCustomError('jaxgpt', f'"{where}" must be an object with "role" and "content".')
  unknown = sorted(set(message) - {'role', 'content'})
  if unknown:
    raise PydanticCustomError('jaxgpt', f'"{where}.{unknown[0]}" is not supported by this server: send only '
                                        '"role" and "content".')
  role, content = message.get('role'), message.get('content')
  if role not in CHAT_ROLES:
    raise PydanticCustomError('jaxgpt', f'"{where}.role" must be one of {", ".join(map(json.dumps, CHAT_ROLES))}; '
                                        f'got {json.dumps(role)}.')
  if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text' and set(p) == {'type', 'text'}
                                       and isinstance(p['text'], str) for p in content):
    content = ''.join(p['text'] for p in content)
  if not isinstance(content, str) or not content.strip():
    raise PydanticCustomError('jaxgpt', f'"{where}.content" must be a non-empty string (or a list of '
                                        f'{{"type": "text", "text"}} parts); got {json.dumps(content)}.')
  return {'role': CHAT_ROLES[role], 'content': content}


def bounded(request_model: type[_Request], max_len: int) -> type[_Request]:
  """`request_model` for a model whose context is `max_len` tokens: a length leaves room for BOS."""
  rule = f'an integer from 1 to {max_len - 1}'
  length = (StrictInt | None, Field(None, ge=1, le=max_len - 1, description=rule))
  lengths = {'max_tokens': length, **({'max_completion_tokens': length} if request_model is ChatRequest else {})}
  return pydantic.create_model(request_model.__name__, __base__=request_model, **lengths)


class RequestError(Exception):
  """A request answered with an error: `status` and OpenAI's error body (`param` names the field at fault)."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.param, self.code = status, param, code

  def body(self) -> dict:
    kind = _ERROR_TYPES.get(self.status, 'invalid_request_error')
    return {'error': {'message': str(self), 'type': kind, 'param': self.param, 'code': self.code}}


def invalid_request(model: type[BaseModel], errors, body) -> RequestError:
  """One readable 400 for pydantic's errors about a request `body` (FastAPI's RequestValidationError)."""
  error = errors[0]
  where = error['loc'][1:]  # after 'body'
  if error['type'] == 'json_invalid':
    return RequestError(400, 'the request body is not valid JSON.')
  if not where:
    if body is None:
      return RequestError(400, 'the request body is empty: send a JSON object.')
    if isinstance(body, bytes):  # FastAPI reads JSON only under a JSON Content-Type (or none)
      return RequestError(400, 'the request body was not read as JSON: send it with '
                               '"Content-Type: application/json".')
    return RequestError(400, 'the request body must be a JSON object.')
  name = where[0]
  if error['type'] == 'extra_forbidden' and len(where) == 1:
    neutral = f' (or send {json.dumps(NEUTRAL_VALUES[name])}, which asks for nothing)' if name in NEUTRAL_VALUES else ''
    return RequestError(400, f'"{name}" is not supported by this server: leave it out{neutral}.', param=name)
  if error['type'] == 'jaxgpt':
    return RequestError(400, error['msg'], param=name)
  rule = model.model_fields[name].description
  if error['type'] == 'missing':
    return RequestError(400, f'"{name}" is required: {rule}.', param=name)
  # The whole value, not the piece of it pydantic names (a list item, one branch of a union).
  return RequestError(400, f'"{name}" must be {rule}; got {json.dumps(body[name])}.', param=name)


# --- responses ----------------------------------------------------------------------------------

def body(kind: str, request_id: str, model_name: str, choices: list[dict], usage: dict | None = None) -> dict:
  """A response (`kind` 'text_completion' or 'chat.completion') or one chunk of a streamed one."""
  answer = {'id': request_id, 'object': kind, 'created': int(time.time()), 'model': model_name, 'choices': choices}
  if usage is not None:
    answer['usage'] = usage
  return answer


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[TextLogprob], offset: int) -> dict:
  """OpenAI's completions shape: the tokens, their log-probs, the likeliest tokens' and where each token starts."""
  offsets, tops = [], []
  for entry in entries:
    offsets.append(offset)
    offset += len(entry.text)
    top = {}
    for text, logprob in entry.top:
      top.setdefault(text, logprob)  # two tokens may read the same: the likelier one
    tops.append(top)
  return {'tokens': [e.text for e in entries], 'token_logprobs': [e.logprob for e in entries],
          'top_logprobs': tops, 'text_offset': offsets}


def chat_logprobs(entries: list[TextLogprob]) -> dict:
  """OpenAI's chat shape: per token its text, log-prob and UTF-8 bytes, and the likeliest tokens' the same."""
  def token(text: str, logprob: float) -> dict:
    return {'token': text, 'logprob': logprob, 'bytes': list(text.encode())}
  return {'content': [{**token(e.text, e.logprob), 'top_logprobs': [token(*t) for t in e.top]} for e in entries],
          'refusal': None}
