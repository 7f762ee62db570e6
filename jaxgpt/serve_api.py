"""The HTTP API's shapes, as OpenAI's completions API has them: the request, the response and the error bodies.

FastAPI validates a request against `CompletionRequest` before the handler
runs, so a value that cannot be decoded is refused (400) before it is queued
with other requests. Each field's description is the rule an invalid value is
told, in one readable message: `'"max_tokens" must be an integer from 1 to 63;
got 500.'`.
"""

import json
import time
from typing import Annotated

import pydantic
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from jaxgpt.sample import SEED_LIMIT

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
_ERROR_TYPES = {401: 'authentication_error', 500: 'server_error', 503: 'server_busy'}


class CompletionRequest(BaseModel):
  """The body of POST /v1/completions; fields OpenAI has and jaxgpt does not use (model, n, ...) are ignored.

  Strict types: a number sent as a string, or true as a number, is a mistake to report, not to guess at.
  """
  prompt: StrictStr = Field(min_length=1, description='a non-empty string')
  max_tokens: StrictInt = 16  # bounded by the model's context in `completion_request`
  temperature: float = Field(1.0, strict=True, ge=0, le=2, description='a number from 0 to 2')
  top_p: float = Field(1.0, strict=True, gt=0, le=1, description='a number in (0, 1]')
  seed: StrictInt = Field(0, ge=0, lt=SEED_LIMIT, description=f'an integer from 0 to {SEED_LIMIT - 1}')
  stream: StrictBool = Field(False, description='true or false')
  stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
      None, description=f'a string or a list of at most {MAX_STOP_SEQUENCES} strings')

  @property
  def stop_sequences(self) -> tuple[str, ...]:
    stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
    return tuple(s for s in stops if s)


def completion_request(max_len: int) -> type[CompletionRequest]:
  """The request model for a model whose context is `max_len` tokens: max_tokens leaves room for BOS."""
  rule = f'an integer from 1 to {max_len - 1}'
  return pydantic.create_model('CompletionRequest', __base__=CompletionRequest,
                               max_tokens=(StrictInt, Field(16, ge=1, le=max_len - 1, description=rule)))


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
      return RequestError(400, 'the request body is empty: send a JSON object with at least "prompt".')
    if isinstance(body, bytes):  # FastAPI reads JSON only under a JSON Content-Type (or none)
      return RequestError(400, 'the request body was not read as JSON: send it with '
                               '"Content-Type: application/json".')
    return RequestError(400, 'the request body must be a JSON object.')
  name = where[0]
  rule = model.model_fields[name].description
  if error['type'] == 'missing':
    return RequestError(400, f'"{name}" is required: {rule}.', param=name)
  # The whole value, not the piece of it pydantic names (a list item, one branch of a union).
  return RequestError(400, f'"{name}" must be {rule}; got {json.dumps(body[name])}.', param=name)


def completion_body(request_id: str, model_name: str, text: str, finish_reason: str | None, safety: dict,
                    usage: dict | None = None) -> dict:
  """A completion, or one piece of a streamed one (no usage)."""
  body = {'id': request_id, 'object': 'text_completion', 'created': int(time.time()), 'model': model_name,
          'choices': [{'text': text, 'index': 0, 'logprobs': None, 'finish_reason': finish_reason}],
          'safety': safety}
  if usage is not None:
    body['usage'] = usage
  return body
