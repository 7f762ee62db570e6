"""Instruction data: Alpaca, chat and preference records rendered through a template, with the responses marked.

A record becomes one text in which each response (with its end marker) sits
between two private-use characters, RESPONSE_START and RESPONSE_END. They ride
through cleaning untouched (no cleaning step changes private-use characters),
so the spans stay right even when cleaning changes the text's length, and the
cleaned files still show exactly what the model sees. At tokenization the
text is cut at the markers: prompt pieces get loss mask 0, responses 1.

Chat records hold their turns as `messages` ({"role", "content"}) or, as
ShareGPT/Vicuna data does, as `conversations` ({"from": "human"|"gpt"|"system",
"value"}). A preference record's text is its prompt followed by two marked
responses, the chosen one first (jaxgpt/data/preference.py splits it in two).
"""

import numpy as np

RESPONSE_START, RESPONSE_END = '\ue000', '\ue001'
FORMATS = ('text', 'alpaca', 'chat', 'preference')
_ROLES = ('system', 'user', 'assistant')
_SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'gpt': 'assistant'}  # a ShareGPT turn's "from" -> role


def string_field(record: dict, name: str) -> tuple[str | None, str]:
  """The string in `record[name]`, or None and why not."""
  if name not in record:
    return None, f'missing field {name!r}'
  value = record[name]
  if not isinstance(value, str):
    return None, f'field {name!r} is not a string'
  if not value.strip():
    return None, f'empty field {name!r}'
  return value, ''


def _response(template, content: str, trained: bool = True) -> str:
  start, end = (RESPONSE_START, RESPONSE_END) if trained else ('', '')
  return template.assistant + start + content + template.end + end


def render(record: dict, data_cfg) -> tuple[str | None, str]:
  """(text with marked responses, '') or (None, why the record is unusable)."""
  template = data_cfg.template
  if data_cfg.format == 'alpaca':
    (instruction, problem), (output, output_problem) = string_field(record, 'instruction'), string_field(record, 'output')
    if problem or output_problem:
      return None, problem or output_problem
    extra = record.get('input') or ''
    user = template.alpaca_input.format(instruction=instruction, input=extra) if extra.strip() else instruction
    return template.user.format(content=user) + _response(template, output), ''
  if data_cfg.format == 'preference':
    return _render_preference(record, template)
  turns, problem = _chat_turns(record)
  if problem:
    return None, problem
  if not any(role == 'assistant' for role, _ in turns):
    return None, 'no assistant message'
  return _render_turns(turns, template, train_on_assistant=True), ''


def _chat_turns(record: dict) -> tuple[list | None, str]:
  """A chat record's turns as (role, content): its `messages`, or ShareGPT's `conversations`."""
  field = 'conversations' if 'conversations' in record and 'messages' not in record else 'messages'
  return _turns(record.get(field), field)


def _turns(messages, field: str) -> tuple[list | None, str]:
  if not isinstance(messages, list) or not messages:
    return None, f'missing field {field!r}' if messages is None else f'field {field!r} is not a list of messages'
  turns = []
  for message in messages:
    turn, problem = _turn(message)
    if problem:
      return None, problem
    turns.append(turn)
  return turns, ''


def _turn(message) -> tuple[tuple[str, str] | None, str]:
  """(role, content) of one message: {"role", "content"} or ShareGPT's {"from", "value"}."""
  if isinstance(message, dict) and 'role' not in message and 'from' in message:
    speaker = message['from']
    role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
      return None, f'ShareGPT speaker {speaker!r} is not one of {", ".join(_SHAREGPT_ROLES)}'
    content, problem = string_field(message, 'value')
  else:
    role = message.get('role') if isinstance(message, dict) else None
    if role not in _ROLES:
      return None, f'message role {role!r} is not one of {", ".join(_ROLES)}'
    content, problem = string_field(message, 'content')
  return (None, problem) if problem else ((role, content), '')


def _render_turns(turns: list, template, train_on_assistant: bool) -> str:
  return ''.join(_response(template, content, train_on_assistant) if role == 'assistant'
                 else template[role].format(content=content) for role, content in turns)


def _render_preference(record: dict, template) -> tuple[str | None, str]:
  """The prompt (a string: the user's turn; or chat turns: `prompt` as a list, or `messages`), then the chosen
  and the rejected response, each marked. Assistant turns inside the prompt are context, not trained on."""
  prompt = record.get('prompt')
  if isinstance(prompt, list) or (prompt is None and ('messages' in record or 'conversations' in record)):
    turns, problem = _turns(prompt, 'prompt') if prompt is not None else _chat_turns(record)
    if not problem and turns[-1][0] == 'assistant':
      problem = 'the prompt ends with an assistant message'
    text = None if problem else _render_turns(turns, template, train_on_assistant=False)
  else:
    text, problem = string_field(record, 'prompt')
    text = None if problem else template.user.format(content=text)
  if problem:
    return None, problem
  responses = []
  for name in ('chosen', 'rejected'):
    response, problem = _assistant_response(record, name)
    if problem:
      return None, problem
    responses.append(response)
  if responses[0] == responses[1]:
    return None, 'chosen and rejected are the same'
  marked = ''.join(RESPONSE_START + response + template.end + RESPONSE_END for response in responses)
  return text + template.assistant + marked, ''


def _assistant_response(record: dict, name: str) -> tuple[str | None, str]:
  """A preference record's `chosen` or `rejected`: a string, an assistant message, or a list of one."""
  value = record.get(name)
  if isinstance(value, str) or value is None:
    return string_field(record, name)
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  turn, problem = _turn(value)
  if problem:
    return None, f'field {name!r}: {problem}'
  if turn[0] != 'assistant':
    return None, f'field {name!r} is not an assistant message'
  return turn[1], ''


def without_markers(text: str) -> str:
  return text.replace(RESPONSE_START, '').replace(RESPONSE_END, '')


def encode(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids framed BOS ... EOS, loss mask) per text; the mask is 1 on response tokens and the final EOS.

  Pieces are tokenized apart, as a prompt is at inference: its tokens then
  match what the model was trained on right up to the response.
  """
  pieces = [_pieces(text) for text in texts]
  flat = tokenizer.encode_batch([p for doc in pieces for p, _ in doc])
  out, i = [], 0
  for doc in pieces:
    ids, mask = [tokenizer.bos_id], [0]
    for _, trained in doc:
      ids += flat[i]
      mask += [int(trained)] * len(flat[i])
      i += 1
    out.append((np.array(ids + [tokenizer.eos_id], np.int32), np.array(mask + [1], np.uint8)))
  return out


def _pieces(text: str) -> list[tuple[str, bool]]:
  pieces, trained = [], False
  for part in text.replace(RESPONSE_END, RESPONSE_START).split(RESPONSE_START):
    if part:
      pieces.append((part, trained))
    trained = not trained
  return pieces
