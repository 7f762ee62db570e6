"""Records with fields (JSONL lines, Parquet and Arrow rows): their key, the numeric filter, their text."""

import hashlib
import json
import math

from jaxgpt.data.instructions import render, string_field
from jaxgpt.data.sources.base import Extracted


def fields_read(data_cfg) -> list[str]:
  """The fields extraction reads: a table source reads only these columns."""
  if data_cfg.format == 'alpaca':
    text = ['instruction', 'input', 'output']
  elif data_cfg.format == 'chat':
    text = ['messages', 'conversations']  # chat turns, or ShareGPT's
  elif data_cfg.format == 'preference':
    text = ['prompt', 'messages', 'conversations', 'chosen', 'rejected']
  elif data_cfg.instruction_field:
    text = [data_cfg.instruction_field, data_cfg.response_field]
  else:
    text = [data_cfg.text_field]
  return list(dict.fromkeys(f for f in [*text, data_cfg.id_field, data_cfg.filter_field] if f))


def required_fields(data_cfg) -> list[str]:
  """The fields without which no record of a table can give text: a table lacking one is a bad shard. (Where one
  of several fields will do, as for a chat's turns, each record says what it lacks.)"""
  optional = (data_cfg.id_field, data_cfg.filter_field, 'input', 'messages', 'conversations', 'prompt')
  return [f for f in fields_read(data_cfg) if f not in optional]


def id_key(value) -> str | None:
  """'id:' and the id's JSON when `value` is usable as an id (a non-empty string or an integer)."""
  if (isinstance(value, str) and value) or (isinstance(value, int) and not isinstance(value, bool)):
    return f'id:{json.dumps(value, ensure_ascii=False)}'
  return None


def jsonl_key(line: bytes, id_field: str) -> str:
  """A JSONL record's identity, whatever line or shard it is in: 'id:' and its `id_field` value when the
  record has one (a non-empty string or an integer), else 'sha256:' and a hash of the line without
  surrounding whitespace.

  An id keeps a record in its split when its text is edited (ids are expected to be unique: records
  sharing one share a split); without one, identical lines share a key, and deduplication keeps one of
  them. The line is parsed here, in the reading process, only when the field's quoted name occurs in it.
  """
  if id_field and f'"{id_field}"'.encode() in line:
    try:
      record = json.loads(line)
    except (ValueError, RecursionError):  # invalid JSON or UTF-8: dropped later, keyed by content meanwhile
      record = None
    key = id_key(record.get(id_field)) if isinstance(record, dict) else None
    if key:
      return key
  return f'sha256:{hashlib.sha256(line.strip()).hexdigest()[:32]}'


def filter_problem(record: dict, data_cfg) -> str:
  """Why `record` fails the numeric filter (data.filter_field within [filter_min, filter_max]), or ''."""
  name = data_cfg.filter_field
  value = record.get(name)
  if value is None:
    return f'no field {name!r}'
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
    return f'{name}={value!r} is not a number'
  if value < data_cfg.filter_min:
    return f'{name}={value} < {data_cfg.filter_min:g}'
  if value > data_cfg.filter_max:
    return f'{name}={value} > {data_cfg.filter_max:g}'
  return ''


def record_text(record: dict, data_cfg) -> Extracted:
  """The text of a record with fields, or why it has none (the filter says no, a field is missing, ...)."""
  if data_cfg.filter_field:
    problem = filter_problem(record, data_cfg)
    if problem:
      return Extracted(None, 'filtered', problem)
  if data_cfg.format != 'text':
    return Extracted(*render(record, data_cfg))
  if data_cfg.instruction_field:
    fields = {}
    for role, name in (('instruction', data_cfg.instruction_field), ('response', data_cfg.response_field)):
      fields[role], problem = string_field(record, name)
      if problem:
        return Extracted(None, problem)
    return Extracted(data_cfg.instruction_format.format(**fields))
  text, problem = string_field(record, data_cfg.text_field)
  return Extracted(text, problem)


def json_line_text(line: str, data_cfg) -> Extracted:
  if not line.strip():
    return Extracted(None, 'blank line')
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return Extracted(None, 'invalid JSON', e.msg)
  if not isinstance(record, dict):
    return Extracted(None, 'not a JSON object', type(record).__name__)
  return record_text(record, data_cfg)
