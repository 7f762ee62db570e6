"""The HTTP server, started for real on a loopback port and called with real HTTP clients, OpenAI's own among them.

One server runs in this process (uvicorn in a thread) for every test but the block-mode one, which
starts the command itself. Expected texts and log-probs are computed here, from the model, apart from it.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from jaxgpt import inference, run_dir, serve
from jaxgpt.config import JaxgptError
from jaxgpt.safety import SafetyChecker
from jaxgpt.sample import Sampling, complete, encode_prompt, generate
from jaxgpt.serve_api import ChatRequest
from jaxgpt.serving_engine import Job
from jaxgpt.serving_metrics import Monitor

FLAGGED_PROMPT = 'def zorblax('  # 'zorblax' is on the servers' blocked word list
OUTPUT_PROMPT = 'def '  # the servers also block a word the model writes after this (see decoded_here)
API_KEY = 'sekrit'
# The chat the tests send; the in-process server's end marker is a piece of the model's reply to it (decoded_here).
CHAT = [{'role': 'user', 'content': 'import '}]
# Two prompts, two choices each, seed 7: (prompt, seed) per choice, in OpenAI's order.
COMPLETION_ROWS = [('def ', 7), ('def ', 8), ('import ', 9), ('import ', 10)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, *args, env=None):
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, '-m', 'jaxgpt.serve', '--workdir', workdir, '--port', str(port), *args],
      cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 120
  while time.time() < deadline:
    if process.poll() is not None:
      raise AssertionError(f'the server exited: {process.stdout.read()[-3000:]}')
    try:
      if httpx.get(f'{url}/health', timeout=1).status_code == 200:
        return process, url
    except httpx.TransportError:
      time.sleep(0.3)
  process.kill()
  raise AssertionError('the server did not answer /health within 120 s')


def _stop(process):
  process.terminate()
  try:
    return process.communicate(timeout=20)[0]
  except subprocess.TimeoutExpired:
    process.kill()
    return process.communicate()[0]


@contextlib.contextmanager
def _serving(app):
  """`app` on a free loopback port, served by uvicorn in a thread of this process."""
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    assert thread.is_alive(), 'the server thread ended before it started serving'
    time.sleep(0.02)
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope='module')
def loaded_run(trained_run):
  """(the loaded run, its tokenizer), in this process."""
  config, tokenizer = run_dir.load_run(trained_run)
  return inference.load(config, tokenizer, trained_run), tokenizer


@pytest.fixture(scope='module')
def decoded_here(trained_run, loaded_run):
  """What the tests expect, decoded here in one batch (a row's tokens do not depend on the batch).

  'completions': COMPLETION_ROWS (8 tokens, temperature 1), each as (token ids from BOS on, new text).
  'flagged': OUTPUT_PROMPT's continuation (24 tokens, temperature 1, seed 3), and a word in it.
  'chat': CHAT's prompt ids written out by hand from the run's template (one piece, as training tokenizes
  a prompt); an end marker, the two characters at a token boundary in the middle of the model's reply
  (8 tokens, temperature 1, seed 3), so a server whose template ends with it must stop there; and the
  replies with seeds 3 and 4 as the server must give them: (text, token ids, finish_reason).
  """
  loaded, tokenizer = loaded_run
  template = run_dir.load_run(trained_run)[0].data.template
  chat_prompt = template.user.format(content=CHAT[0]['content']) + template.assistant
  chat_ids = [tokenizer.bos_id, *tokenizer.encode(chat_prompt)]
  completion_ids = [encode_prompt(tokenizer, p) for p, _ in COMPLETION_ROWS]
  rows = [*zip(completion_ids, [Sampling(max_new_tokens=8, temperature=1.0, seed=s) for _, s in COMPLETION_ROWS]),
          (encode_prompt(tokenizer, OUTPUT_PROMPT), Sampling(max_new_tokens=24, temperature=1.0, seed=3)),
          *((chat_ids, Sampling(max_new_tokens=8, temperature=1.0, seed=s)) for s in (3, 4))]
  outputs = generate(loaded.model, loaded.params, [ids for ids, _ in rows], [s for _, s in rows],
                     eos_id=tokenizer.eos_id)
  completions = [(ids + o.tokens, tokenizer.decode(o.tokens)) for ids, o in zip(completion_ids, outputs)]
  flagged_text = tokenizer.decode(outputs[4].tokens)
  words = re.findall(r'\b[A-Za-z]{3,}\b', flagged_text)  # whole words, as the checker matches them
  assert words, flagged_text
  tokens = outputs[5].tokens
  text = tokenizer.decode(tokens)
  boundaries = [len(tokenizer.decode(tokens[:i])) for i in range(len(tokens))]
  end = next(i for i in range(len(tokens) // 3, len(tokens)) if re.fullmatch(r'\S\S', text[boundaries[i]:][:2])
             and text.find(text[boundaries[i]:][:2]) == boundaries[i])
  marker = text[boundaries[end]:][:2]
  other = tokenizer.decode(outputs[6].tokens)
  replies = [(text[:boundaries[end]], tokens[:end], 'stop'),
             (other[:other.index(marker)], None, 'stop') if marker in other else
             (other, outputs[6].tokens, outputs[6].finish_reason)]
  return {'completions': completions, 'flagged': (words[0], flagged_text), 'chat': (chat_ids, marker, replies)}


@dataclasses.dataclass
class Served:
  client: httpx.Client
  url: str
  model: str
  service: serve.Service
  audit_log: str


@pytest.fixture(scope='module')
def server(trained_run, loaded_run, decoded_here, tmp_path_factory):
  """The in-process server: zorblax and the flagged word blocked, an API key, an audit log, the chat's end marker."""
  loaded, tokenizer = loaded_run
  config, _ = run_dir.load_run(trained_run)
  config.data.template.end = decoded_here['chat'][1] + '\n'
  checker = SafetyChecker(ml_collections.ConfigDict({'blocked_words': ['zorblax', decoded_here['flagged'][0]]}))
  audit_log = str(tmp_path_factory.mktemp('serve') / 'audit.jsonl')
  service = serve.build_service(trained_run, loaded, config, tokenizer, checker=checker, audit_log=audit_log,
                                api_key=API_KEY, max_batch=8, queue_size=64)
  with _serving(serve.create_app(service)) as url:
    with httpx.Client(base_url=url, headers={'Authorization': f'Bearer {API_KEY}'}, timeout=120) as client:
      yield Served(client, url, os.path.basename(trained_run), service, audit_log)


@pytest.fixture(scope='module')
def openai_client(server):
  with openai.OpenAI(base_url=f'{server.url}/v1', api_key=API_KEY, max_retries=0, timeout=120) as client:
    yield client


def _log_softmax(loaded, ids):
  """The model's log-probabilities of the next token after each prefix of `ids`: [len(ids), vocab]."""
  with loaded.activation_rules():
    logits = loaded.model.apply({'params': loaded.params}, jnp.array([ids]))[0]
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))


# --- the OpenAI API, through OpenAI's own client ------------------------------------------------------

def test_models_and_health(server, openai_client, loaded_run):
  assert server.client.get('/health').json()['status'] == 'ok'
  assert [m.id for m in openai_client.models.list()] == [server.model]
  info = server.client.get('/v1/models').json()['data'][0]
  loaded, _ = loaded_run
  assert info['id'] == server.model and info['context_length'] == 64 and info['step'] == 10
  assert info['parameters'] == sum(x.size for x in jax.tree.leaves(loaded.params))


def test_completions_several_prompts_and_choices_in_one_call(openai_client, server, decoded_here, loaded_run):
  completions_here = decoded_here['completions']
  _, tokenizer = loaded_run
  request = dict(model=server.model, prompt=['def ', 'import '], n=2, max_tokens=8, temperature=1.0, seed=7)
  answer = openai_client.completions.create(**request)
  assert [c.index for c in answer.choices] == [0, 1, 2, 3]
  # Choice i is seed + i: what the model gives here with those settings.
  assert [c.text for c in answer.choices] == [text for _, text in completions_here]
  assert answer.choices[0].text != answer.choices[1].text and answer.choices[2].text != answer.choices[3].text
  assert answer.usage.prompt_tokens == len(encode_prompt(tokenizer, 'def ')) + len(encode_prompt(tokenizer, 'import '))
  assert answer.usage.completion_tokens == sum(len(ids) - len(encode_prompt(tokenizer, p))
                                               for (ids, _), (p, _) in zip(completions_here, COMPLETION_ROWS))
  assert [c.text for c in openai_client.completions.create(**request).choices] == [c.text for c in answer.choices]
  # Without a seed, a fresh sample each time: two requests, and two choices of one, all differ.
  unseeded = {**request, 'seed': None, 'prompt': 'def '}
  texts = [c.text for _ in range(2) for c in openai_client.completions.create(**unseeded).choices]
  assert len(set(texts)) == 4, texts


def test_completion_logprobs_and_echo_are_the_models(openai_client, server, decoded_here, loaded_run):
  loaded, tokenizer = loaded_run
  ids, text = decoded_here['completions'][0]  # 'def ', seed 7
  answer = openai_client.completions.create(model=server.model, prompt='def ', max_tokens=8, temperature=1.0, seed=7,
                                            logprobs=3, echo=True)
  choice = answer.choices[0]
  assert choice.text == 'def ' + text  # echo; log-probs change nothing of the sample
  lp = choice.logprobs
  assert ''.join(lp.tokens) == choice.text and len(lp.tokens) == len(ids) - 1  # every token after BOS
  assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
  expected = _log_softmax(loaded, ids)  # row t: the next token after ids[:t + 1]
  np.testing.assert_allclose(lp.token_logprobs, [expected[t - 1, ids[t]] for t in range(1, len(ids))], atol=1e-4)
  for t, top in enumerate(lp.top_logprobs):
    best = np.sort(expected[t])[::-1][:3]
    assert 1 <= len(top) <= 3  # two of the three tokens may read the same
    np.testing.assert_allclose(max(top.values()), best[0], atol=1e-4)
    assert all(np.isclose(best, v, atol=1e-4).any() for v in top.values())
  # Log-probs are the model's, not the sampler's: at temperature 0.5 the likeliest first token's is still the
  # model's log-softmax maximum after the prompt (a tempered distribution would put it nearer 0).
  tempered = openai_client.completions.create(model=server.model, prompt='def ', max_tokens=8, temperature=0.5,
                                              seed=7, logprobs=3, echo=True).choices[0].logprobs
  prompt_tokens = len(encode_prompt(tokenizer, 'def '))
  assert tempered.token_logprobs[:prompt_tokens - 1] == lp.token_logprobs[:prompt_tokens - 1]
  np.testing.assert_allclose(max(tempered.top_logprobs[prompt_tokens - 1].values()), expected[prompt_tokens - 1].max(),
                             atol=1e-4)
  # Streamed: the same tokens, each piece's log-probs those of its own text.
  pieces = list(openai_client.completions.create(model=server.model, prompt='def ', max_tokens=8, temperature=1.0,
                                                 seed=7, logprobs=3, echo=True, stream=True))
  assert ''.join(p.choices[0].text for p in pieces) == choice.text
  assert all(''.join(p.choices[0].logprobs.tokens) == p.choices[0].text for p in pieces)
  assert [o for p in pieces for o in p.choices[0].logprobs.text_offset] == lp.text_offset
  assert pieces[-1].choices[0].finish_reason == choice.finish_reason


def test_completions_stream_each_choice_in_pieces(openai_client, server, decoded_here):
  request = dict(model=server.model, prompt=['def ', 'import '], n=2, max_tokens=8, temperature=1.0, seed=7)
  texts, finished = ['', '', '', ''], [None] * 4
  for chunk in openai_client.completions.create(**request, stream=True):
    assert chunk.object == 'text_completion' and len(chunk.choices) == 1
    choice = chunk.choices[0]
    assert finished[choice.index] is None  # nothing after a choice's last piece
    texts[choice.index] += choice.text
    finished[choice.index] = choice.finish_reason
  assert texts == [text for _, text in decoded_here['completions']] and all(finished)


def test_chat_completions_apply_the_runs_template_and_stop_at_its_end_marker(openai_client, server, decoded_here,
                                                                             loaded_run):
  loaded, _ = loaded_run
  ids, marker, replies = decoded_here['chat']
  answer = openai_client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=8, temperature=1.0,
                                                 seed=3, n=2, logprobs=True, top_logprobs=2)
  assert answer.object == 'chat.completion' and answer.usage.prompt_tokens == len(ids)
  for choice, (text, _, reason) in zip(answer.choices, replies):
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ('assistant', text, reason)
  assert marker not in answer.choices[0].message.content
  # Log-probs of the reply's tokens as the model gives them after the rendered prompt.
  content, reply_ids = answer.choices[0].logprobs.content, replies[0][1]
  assert ''.join(t.token for t in content) == replies[0][0] and len(content) == len(reply_ids)
  expected = _log_softmax(loaded, ids + reply_ids)[len(ids) - 1:]
  np.testing.assert_allclose([t.logprob for t in content], expected[np.arange(len(reply_ids)), reply_ids], atol=1e-4)
  np.testing.assert_allclose([[top.logprob for top in t.top_logprobs] for t in content],
                             np.sort(expected, axis=-1)[:len(reply_ids), ::-1][:, :2], atol=1e-4)
  # Streamed: the role first, then the same text in pieces.
  chunks = list(openai_client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=8,
                                                      temperature=1.0, seed=3, stream=True, logprobs=True,
                                                      stream_options={'include_usage': True}))
  assert all(c.object == 'chat.completion.chunk' for c in chunks)
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks[:-1]) == replies[0][0]
  assert chunks[-2].choices[0].finish_reason == 'stop'
  assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)


def test_a_conversation_is_rendered_as_training_renders_it(server, loaded_run):
  _, tokenizer = loaded_run
  t = server.service.chat_format.template
  conversation = ChatRequest(messages=[  # as the server reads them: 'developer' is the template's 'system'
      {'role': 'system', 'content': 'You write Python.'}, *CHAT, {'role': 'assistant', 'content': 'import os'},
      {'role': 'developer', 'content': 'Be brief.'}, {'role': 'user', 'content': 'and sys?'}]).messages
  # Pieces tokenized apart, as training tokenizes them: the prompt, the reply (with its end marker), the rest.
  pieces = [t.system.format(content='You write Python.') + t.user.format(content='import ') + t.assistant,
            'import os' + t.end, t.system.format(content='Be brief.') + t.user.format(content='and sys?') + t.assistant]
  assert server.service.chat_prompt(conversation).ids == [tokenizer.bos_id, *sum(map(tokenizer.encode, pieces), [])]


def test_unknown_model_and_unsupported_fields_are_refused_by_name(openai_client, server):
  with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
    openai_client.completions.create(model='gpt-4o', prompt='def ', max_tokens=2)
  for call in (lambda **kw: openai_client.completions.create(prompt='def ', **kw),
               lambda **kw: openai_client.chat.completions.create(messages=CHAT, **kw)):
    with pytest.raises(openai.BadRequestError) as refused:
      call(model=server.model, max_tokens=2, presence_penalty=0.5)
    assert refused.value.body['param'] == 'presence_penalty' and 'not supported' in refused.value.body['message']
    with pytest.raises(openai.BadRequestError) as refused:
      call(model=server.model, max_tokens=2, extra_body={'guided_json': {}})
    assert refused.value.body['param'] == 'guided_json'
  # The value that asks for nothing is accepted, as some clients send it by default.
  assert openai_client.completions.create(model=server.model, prompt='def ', max_tokens=8, presence_penalty=0,
                                          seed=7, temperature=1.0).choices[0].text


def _metrics(server) -> dict:
  samples = {}
  for family in text_string_to_metric_families(server.client.get('/metrics').text):
    for sample in family.samples:
      samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
  return samples


def _grew(before: dict, after: dict, name: str, **labels) -> float:
  key = (name, tuple(sorted(labels.items())))
  return after.get(key, 0) - before.get(key, 0)


def test_metrics_count_what_was_sent_and_the_audit_log_holds_the_flagged(server):
  before = _metrics(server)
  good = server.client.post('/v1/completions', json={'prompt': FLAGGED_PROMPT, 'max_tokens': 8, 'seed': 1}).json()
  chat = server.client.post('/v1/chat/completions', json={'messages': CHAT, 'max_tokens': 8, 'seed': 3,
                                                           'logprobs': True}).json()  # compiled for the chat test
  assert server.client.post('/v1/completions', json={'prompt': 'x', 'n': 0}).status_code == 400
  assert server.client.post('/v1/completions', json={'prompt': 'x', 'model': 'other'}).status_code == 404
  after = _metrics(server)
  completions = '/v1/completions'
  assert _grew(before, after, 'jaxgpt_requests_total', endpoint=completions, status='200') == 1
  assert _grew(before, after, 'jaxgpt_requests_total', endpoint=completions, status='400') == 1
  assert _grew(before, after, 'jaxgpt_requests_total', endpoint=completions, status='404') == 1
  assert _grew(before, after, 'jaxgpt_requests_total', endpoint='/v1/chat/completions', status='200') == 1
  assert _grew(before, after, 'jaxgpt_request_seconds_count', endpoint=completions) == 3
  assert _grew(before, after, 'jaxgpt_generated_tokens_total', endpoint=completions) == \
      good['usage']['completion_tokens']
  assert _grew(before, after, 'jaxgpt_prompt_tokens_total', endpoint='/v1/chat/completions') == \
      chat['usage']['prompt_tokens']
  assert _grew(before, after, 'jaxgpt_safety_flags_total', text='prompt', kind='blocked_word', action='flagged') == 1
  assert after[('jaxgpt_queue_depth', ())] == 0
  records = [json.loads(line) for line in open(server.audit_log)]
  record = next(r for r in records if r['request_id'] == good['id'])
  assert record['text_kind'] == 'prompt' and record['action'] == 'flagged' and record['text'] == FLAGGED_PROMPT
  assert record['words'] == ['zorblax'] and isinstance(record['score'], float) and record['time'].endswith('+00:00')


def test_an_audit_log_in_a_bucket_is_refused():
  with pytest.raises(JaxgptError, match='cannot be appended to'):
    Monitor(lambda: 0, 'gs://bucket/audit.jsonl')


# --- the HTTP details --------------------------------------------------------------------------

def test_completion_is_deterministic_and_counts_tokens(server, loaded_run):
  client = server.client
  request = {'prompt': 'import os\n', 'max_tokens': 12, 'temperature': 0.8, 'seed': 5}
  first, second = client.post('/v1/completions', json=request), client.post('/v1/completions', json=request)
  assert first.status_code == 200, first.text
  body = first.json()
  choice = body['choices'][0]
  assert choice['text'] == second.json()['choices'][0]['text']
  assert body['object'] == 'text_completion'
  # What the model gives in-process with those settings: the server passed max_tokens, temperature and seed on.
  loaded, tokenizer = loaded_run
  expected = complete(loaded.model, loaded.params, tokenizer, [request['prompt']],
                      Sampling(max_new_tokens=12, temperature=0.8, seed=5))[0]
  assert (choice['text'], choice['finish_reason']) == (expected.text, expected.finish_reason)
  assert body['usage'] == {'prompt_tokens': len(encode_prompt(tokenizer, request['prompt'])),
                           'completion_tokens': expected.num_tokens,
                           'total_tokens': len(encode_prompt(tokenizer, request['prompt'])) + expected.num_tokens}
  assert choice['safety']['prompt']['profane'] is False


def test_streaming_sends_the_same_text_in_pieces(server):
  client = server.client
  request = {'prompt': 'class ', 'max_tokens': 30, 'temperature': 1.0, 'seed': 2}
  whole = client.post('/v1/completions', json=request).json()['choices'][0]
  events = []
  with client.stream('POST', '/v1/completions', json={**request, 'stream': True}) as response:
    assert response.status_code == 200 and response.headers['content-type'].startswith('text/event-stream')
    for line in response.iter_lines():
      if line.startswith('data: '):
        events.append(line[len('data: '):])
  assert events[-1] == '[DONE]'
  chunks = [json.loads(e)['choices'][0] for e in events[:-1]]
  assert len(chunks) >= 2  # 30 tokens in pieces of 8 decode steps
  assert ''.join(c['text'] for c in chunks) == whole['text']
  assert chunks[-1]['finish_reason'] == whole['finish_reason'] and all(c['finish_reason'] is None for c in chunks[:-1])


def test_stop_sequence_cuts_the_text(server):
  client = server.client
  request = {'prompt': 'class ', 'max_tokens': 30, 'temperature': 1.0, 'seed': 2}
  whole = client.post('/v1/completions', json=request).json()['choices'][0]['text']
  stop = whole[len(whole) // 2:len(whole) // 2 + 2]
  assert len(stop) == 2, whole  # an empty stop string would be found at 0 whatever the server did
  cut = client.post('/v1/completions', json={**request, 'stop': [stop]}).json()['choices'][0]
  assert cut['text'] == whole[:whole.index(stop)] and cut['finish_reason'] == 'stop'


COMPLETIONS, CHAT_URL = '/v1/completions', '/v1/chat/completions'


@pytest.mark.parametrize('url,body,message,param', [
    (COMPLETIONS, b'{"prompt": "x", ', 'not valid JSON', None),
    (COMPLETIONS, b'', 'the request body is empty', None),
    (COMPLETIONS, b'["prompt"]', 'must be a JSON object', None),
    (COMPLETIONS, b'{"max_tokens": 4}', '"prompt" is required', 'prompt'),
    (COMPLETIONS, b'{"prompt": 42}', '"prompt" must be a non-empty string or a non-empty list of them', 'prompt'),
    (COMPLETIONS, b'{"prompt": ""}', 'got "".', 'prompt'),
    (COMPLETIONS, b'{"prompt": [1, 2, 3]}', 'prompts as token ids are not supported', 'prompt'),
    (COMPLETIONS, b'{"prompt": "\\ud800"}', r'got "\ud800".', 'prompt'),  # not Unicode
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 0}', '"max_tokens" must be an integer from 1 to 63; got 0.',
     'max_tokens'),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 5000}', 'from 1 to 63; got 5000.', 'max_tokens'),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": "8"}', 'got "8".', 'max_tokens'),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 8.5}', 'got 8.5.', 'max_tokens'),
    (COMPLETIONS, b'{"prompt": "x", "temperature": -1}', '"temperature" must be a number from 0 to 2; got -1.',
     'temperature'),
    (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 'a number from 0 to 2; got NaN.', 'temperature'),
    (COMPLETIONS, b'{"prompt": "x", "top_p": 0}', '"top_p" must be a number in (0, 1]; got 0.', 'top_p'),
    (COMPLETIONS, b'{"prompt": "x", "seed": 1099511627776}',
     '"seed" must be an integer from 0 to 4294967295; got 1099511627776.', 'seed'),
    (COMPLETIONS, b'{"prompt": "x", "seed": -1}', 'got -1.', 'seed'),
    (COMPLETIONS, b'{"prompt": "x", "seed": true}', 'got true.', 'seed'),
    (COMPLETIONS, b'{"prompt": "x", "stream": "yes"}', '"stream" must be true or false; got "yes".', 'stream'),
    (COMPLETIONS, b'{"prompt": "x", "stop": [1, 2]}',
     '"stop" must be a string or a list of at most 4 strings; got [1, 2].', 'stop'),
    (COMPLETIONS, b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 'at most 4 strings', 'stop'),
    (COMPLETIONS, b'{"prompt": "x", "n": 0}', '"n" must be an integer from 1 to 128; got 0.', 'n'),
    (COMPLETIONS, b'{"prompt": "x", "n": 65}', 'this server takes at most 64 in one request', 'n'),
    (COMPLETIONS, b'{"prompt": "x", "logprobs": 21}', '"logprobs" must be an integer from 0 to 20; got 21.',
     'logprobs'),
    (COMPLETIONS, b'{"prompt": "x", "logprobs": true}', 'got true.', 'logprobs'),
    (COMPLETIONS, b'{"prompt": "x", "echo": 1}', '"echo" must be true or false; got 1.', 'echo'),
    (COMPLETIONS, b'{"prompt": "x", "best_of": 3}', '"best_of" is not supported by this server: leave it out (or '
     'send 1, which asks for nothing).', 'best_of'),
    (COMPLETIONS, b'{"prompt": "x", "stream_options": {"include_usage": true}}',
     '"stream_options" is only allowed with "stream": true.', 'stream_options'),
    (COMPLETIONS, b'{"prompt": "x", "stream": true, "stream_options": {"x": 1}}',
     '"stream_options" must be an object with "include_usage"', 'stream_options'),
    (COMPLETIONS, json.dumps({'prompt': 'word ' * 80}).encode(), "exceed the model's context of 64 tokens", 'prompt'),
    (CHAT_URL, b'{"messages": []}', '"messages" must be a non-empty list of {"role", "content"} objects; got [].',
     'messages'),
    (CHAT_URL, b'{"messages": [{"role": "tool", "content": "x"}]}',
     '"messages[0].role" must be one of "system", "developer", "user", "assistant"; got "tool".', 'messages'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": ""}]}', '"messages[0].content" must be a non-empty string',
     'messages'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     '"messages[0].content" must be a non-empty string (or a list of {"type": "text", "text"} parts)', 'messages'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": "x", "name": "bob"}]}',
     '"messages[0].name" is not supported by this server', 'messages'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
     '"top_logprobs" needs "logprobs": true.', 'top_logprobs'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": "x"}], "echo": true}',
     '"echo" is not supported by this server', 'echo'),
    (CHAT_URL, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "max_completion_tokens": 5}',
     '"max_tokens" and "max_completion_tokens" disagree', 'max_completion_tokens'),
    (CHAT_URL, json.dumps({'messages': [{'role': 'user', 'content': 'word ' * 80}]}).encode(),
     "exceed the model's context of 64 tokens", 'messages'),
])
def test_bad_requests_get_one_clear_400(server, url, body, message, param):
  response = server.client.post(url, content=body, headers={'Content-Type': 'application/json'})
  assert response.status_code == 400, response.text
  error = response.json()['error']  # OpenAI's error shape
  assert message in error['message'] and error['param'] == param, response.text
  assert error['type'] == 'invalid_request_error' and set(error) == {'message', 'type', 'param', 'code'}


def test_a_body_without_content_type_is_read_as_json_and_a_text_one_refused(server):
  client = server.client
  without = client.post('/v1/completions', content=b'{"prompt": "x", "max_tokens": 2}', headers={'Content-Type': ''})
  assert without.status_code == 200, without.text
  as_text = client.post('/v1/completions', content=b'{"prompt": "x"}', headers={'Content-Type': 'text/plain'})
  assert as_text.status_code == 400 and 'Content-Type: application/json' in as_text.json()['error']['message']


def test_api_key_is_required(server):
  for headers in ({}, {'Authorization': 'Bearer wrong'}):
    for url in ('/v1/completions', '/v1/chat/completions'):
      for body in (b'{"prompt": "x"}', b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": '):
        response = httpx.post(f'{server.url}{url}', content=body,
                              headers={**headers, 'Content-Type': 'application/json'})
        error = response.json()['error']
        assert response.status_code == 401 and 'API key' in error['message'] and error['code'] == 'invalid_api_key'


def test_one_bad_request_does_not_fail_the_others_sent_with_it(server):
  client = server.client
  good = [{'prompt': f'def g{i}(', 'max_tokens': 8, 'temperature': 0.7, 'seed': i} for i in range(5)]
  bad = {'prompt': 'def g(', 'max_tokens': 8, 'temperature': 0.7, 'seed': 2**40}  # a uint32 seed cannot hold it
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    responses = list(pool.map(lambda r: client.post('/v1/completions', json=r), [*good[:3], bad, *good[3:]]))
  bad_response = responses.pop(3)
  assert bad_response.status_code == 400 and bad_response.json()['error']['param'] == 'seed', bad_response.text
  assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
  for request, response in zip(good, responses):
    alone = client.post('/v1/completions', json=request).json()['choices'][0]
    assert response.json()['choices'][0] == alone and alone['finish_reason'] in ('stop', 'length')


def test_a_failed_batch_answers_its_own_requests_and_the_worker_goes_on(server, decoded_here):
  engine, text = server.service.engine, decoded_here['completions'][0][1]  # 'def ', seed 7

  async def answers():
    loop = asyncio.get_running_loop()
    # A prompt that is not token ids fails its batch inside the decoder, past every check a request goes through.
    broken, good = asyncio.Queue(), asyncio.Queue()
    engine.submit([Job(0, None, Sampling(max_new_tokens=8), loop, broken)])
    failure = (await asyncio.wait_for(broken.get(), 120))[1]
    prompt = encode_prompt(server.service.tokenizer, 'def ')
    engine.submit([Job(0, prompt, Sampling(max_new_tokens=8, temperature=1.0, seed=7), loop, good)])
    deltas = [(await asyncio.wait_for(good.get(), 120))[1]]
    while not isinstance(deltas[-1], Exception) and deltas[-1].finish_reason is None:
      deltas.append((await asyncio.wait_for(good.get(), 120))[1])
    return failure, deltas

  failure, deltas = asyncio.run(answers())
  assert isinstance(failure, TypeError)
  assert ''.join(d.text for d in deltas) == text and deltas[-1].finish_reason is not None


def test_fifty_concurrent_requests_are_all_answered(server):
  client = server.client
  requests = [{'prompt': f'def f{i}(', 'max_tokens': 6 + i % 5, 'temperature': 0.7, 'seed': i} for i in range(50)]
  with concurrent.futures.ThreadPoolExecutor(50) as pool:
    responses = list(pool.map(lambda r: client.post('/v1/completions', json=r), requests))
  assert [r.status_code for r in responses] == [200] * 50
  # Batched with others, each request gets what it gets alone.
  for i in (0, 17, 49):
    alone = client.post('/v1/completions', json=requests[i]).json()['choices'][0]['text']
    assert responses[i].json()['choices'][0]['text'] == alone


def test_flagged_prompt_and_output_carry_their_flags(server, decoded_here):
  client = server.client
  word, expected_text = decoded_here['flagged']
  flagged_prompt = client.post('/v1/completions', json={'prompt': FLAGGED_PROMPT, 'max_tokens': 4}).json()
  safety = flagged_prompt['choices'][0]['safety']
  assert safety['prompt']['profane'] and safety['prompt']['words'] == ['zorblax']
  body = client.post('/v1/completions', json={'prompt': OUTPUT_PROMPT, 'max_tokens': 24, 'temperature': 1.0,
                                               'seed': 3}).json()
  choice = body['choices'][0]
  assert choice['text'] == expected_text  # flag mode: the text is returned
  assert not choice['safety']['prompt']['profane']
  assert choice['safety']['output']['profane'] and word.lower() in choice['safety']['output']['words']
  record = [json.loads(line) for line in open(server.audit_log) if json.loads(line)['request_id'] == body['id']]
  assert [(r['text_kind'], r['action'], r['choice'], r['text']) for r in record] == [
      ('output', 'flagged', 0, expected_text)]


def test_block_mode_and_a_full_queue(trained_run, decoded_here, tmp_path):
  word, _ = decoded_here['flagged']
  audit_log = tmp_path / 'audit.jsonl'
  process, url = _start(trained_run, f'--blocked_words=zorblax,{word}', '--safety=block', '--max_batch=1',
                        '--queue_size=1', '--chunk_tokens=1', f'--audit_log={audit_log}')
  try:
    with httpx.Client(base_url=url, timeout=120) as client:
      refused = client.post('/v1/completions', json={'prompt': FLAGGED_PROMPT, 'max_tokens': 4})
      assert refused.status_code == 400 and 'flagged by the safety checker' in refused.json()['error']['message']
      withheld = client.post('/v1/completions', json={'prompt': OUTPUT_PROMPT, 'max_tokens': 24,
                                                      'temperature': 1.0, 'seed': 3}).json()
      choice = withheld['choices'][0]
      assert (choice['text'], choice['logprobs'], choice['finish_reason']) == ('', None, 'content_filter')
      # One decoding, one waiting: the rest of 12 simultaneous requests are turned away, none left hanging.
      with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: client.post('/v1/completions', json={
            'prompt': 'import', 'max_tokens': 40, 'temperature': 1.0, 'seed': i}).status_code, range(12)))
      assert set(statuses) == {200, 503} and statuses.count(200) >= 2
      metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in text_string_to_metric_families(client.get('/metrics').text) for s in family.samples}
  finally:
    output = _stop(process)
  assert 'flagged prompt' in output and 'flagged output' in output
  requests = lambda status: metrics[('jaxgpt_requests_total', (('endpoint', '/v1/completions'), ('status', status)))]
  assert (requests('200'), requests('400'), requests('503')) == (statuses.count(200) + 1, 1, statuses.count(503))
  flags = lambda text, action: metrics[('jaxgpt_safety_flags_total',
                                        (('action', action), ('kind', 'blocked_word'), ('text', text)))]
  records = [json.loads(line) for line in audit_log.read_text().splitlines()]
  assert [(r['text_kind'], r['action'], r['words']) for r in records[:2]] == [
      ('prompt', 'refused', ['zorblax']), ('output', 'withheld', [word.lower()])]
  assert records[1]['request_id'] == withheld['id'] and word in records[1]['text']
  assert flags('prompt', 'refused') == 1 and flags('output', 'withheld') == len(records) - 1  # 'import ...' may be too
