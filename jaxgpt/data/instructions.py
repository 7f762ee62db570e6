"""Instruction data: Alpaca and chat records rendered through a template, with the responses marked.

A record becomes one text in which each response (with its end marker) sits
between two private-use characters, RESPONSE_START and RESPONSE_END. They ride
through cleaning untouched (no cleaning step changes private-use characters),
so the spans stay right even when cleaning changes the text's length, and the
cleaned files still show exactly what the model sees. At tokenization the
text is cut at the markers: prompt pieces get loss mask 0, responses 1.
"""

import numpy as np

RESPONSE_START, RESPONSE_END = '\ue000', '\ue001'
FORMATS = ('text', 'alpaca', 'chat')
_ROLES = ('system', 'user', 'assistant')


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


def _response(template, content: str) -> str:
  return template.assistant + RESPONSE_START + content + template.end + RESPONSE_END


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
  messages = record.get('messages')
  if not isinstance(messages, list) or not messages:
    return None, "missing field 'messages'"
  parts = []
  for message in messages:
    role = message.get('role') if isinstance(message, dict) else None
    if role not in _ROLES:
      return None, f'message role {role!r} is not one of {", ".join(_ROLES)}'
    content, problem = string_field(message, 'content')
    if problem:
      return None, problem
    parts.append(_response(template, content) if role == 'assistant' else template[role].format(content=content))
  if not any(m['role'] == 'assistant' for m in messages):
    return None, 'no assistant message'
  return ''.join(parts), ''


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
