"""The HTTP server, started for real on a loopback port and called with a real HTTP client."""

import asyncio
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import jax
import pytest

from conftest import REPO
from jaxgpt import inference, run_dir
from jaxgpt.sample import Sampling, complete, encode_prompt
from jaxgpt.serve import Engine, Job

FLAGGED_PROMPT = 'def zorblax('  # 'zorblax' is on the servers' blocked word list
OUTPUT_PROMPT = 'def '  # the servers also block a word the model writes after this (see flagged_word)


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


@pytest.fixture(scope='module')
def loaded_run(trained_run):
  """(the loaded run, its tokenizer), in this process."""
  config, tokenizer = run_dir.load_run(trained_run)
  return inference.load(config, tokenizer, trained_run), tokenizer


@pytest.fixture(scope='module')
def flagged_word(loaded_run):
  """A word that the model writes after OUTPUT_PROMPT (temperature 1, seed 3), found by running it here."""
  loaded, tokenizer = loaded_run
  text = complete(loaded.model, loaded.params, tokenizer, [OUTPUT_PROMPT],
                  Sampling(max_new_tokens=24, temperature=1.0, seed=3))[0].text
  words = re.findall(r'\b[A-Za-z]{3,}\b', text)  # whole words, as the checker matches them
  assert words, text
  return words[0], text


@pytest.fixture(scope='module')
def server(trained_run, flagged_word):
  process, url = _start(trained_run, f'--blocked_words=zorblax,{flagged_word[0]}', '--max_batch=8',
                        '--queue_size=64', env={'JAXGPT_API_KEY': 'sekrit'})
  client = httpx.Client(base_url=url, headers={'Authorization': 'Bearer sekrit'}, timeout=120)
  yield client, process
  client.close()
  _stop(process)


def test_health_and_model_info(server, loaded_run):
  client, _ = server
  assert client.get('/health').json()['status'] == 'ok'
  info = client.get('/v1/models').json()['data'][0]
  loaded, _ = loaded_run
  assert info['context_length'] == 64 and info['step'] == 10
  assert info['parameters'] == sum(x.size for x in jax.tree.leaves(loaded.params))


def test_completion_is_deterministic_and_counts_tokens(server, loaded_run):
  client, _ = server
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
  assert body['safety']['prompt']['profane'] is False


def test_streaming_sends_the_same_text_in_pieces(server):
  client, _ = server
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
  client, _ = server
  request = {'prompt': 'class ', 'max_tokens': 30, 'temperature': 1.0, 'seed': 2}
  whole = client.post('/v1/completions', json=request).json()['choices'][0]['text']
  stop = whole[len(whole) // 2:len(whole) // 2 + 2]
  assert len(stop) == 2, whole  # an empty stop string would be found at 0 whatever the server did
  cut = client.post('/v1/completions', json={**request, 'stop': [stop]}).json()['choices'][0]
  assert cut['text'] == whole[:whole.index(stop)] and cut['finish_reason'] == 'stop'


@pytest.mark.parametrize('body,message,param', [
    (b'{"prompt": "x", ', 'not valid JSON', None),
    (b'', 'the request body is empty', None),
    (b'["prompt"]', 'must be a JSON object', None),
    (b'{"max_tokens": 4}', '"prompt" is required', 'prompt'),
    (b'{"prompt": 42}', '"prompt" must be a non-empty string; got 42.', 'prompt'),
    (b'{"prompt": ""}', '"prompt" must be a non-empty string; got "".', 'prompt'),
    (b'{"prompt": "\\ud800"}', r'"prompt" must be a non-empty string; got "\ud800".', 'prompt'),  # not Unicode
    (b'{"prompt": "x", "max_tokens": 0}', '"max_tokens" must be an integer from 1 to 63; got 0.', 'max_tokens'),
    (b'{"prompt": "x", "max_tokens": 5000}', 'from 1 to 63; got 5000.', 'max_tokens'),
    (b'{"prompt": "x", "max_tokens": "8"}', 'got "8".', 'max_tokens'),
    (b'{"prompt": "x", "max_tokens": 8.5}', 'got 8.5.', 'max_tokens'),
    (b'{"prompt": "x", "temperature": -1}', '"temperature" must be a number from 0 to 2; got -1.', 'temperature'),
    (b'{"prompt": "x", "temperature": NaN}', 'a number from 0 to 2; got NaN.', 'temperature'),
    (b'{"prompt": "x", "top_p": 0}', '"top_p" must be a number in (0, 1]; got 0.', 'top_p'),
    (b'{"prompt": "x", "seed": 1099511627776}', '"seed" must be an integer from 0 to 4294967295; got 1099511627776.',
     'seed'),
    (b'{"prompt": "x", "seed": -1}', 'got -1.', 'seed'),
    (b'{"prompt": "x", "seed": true}', 'got true.', 'seed'),
    (b'{"prompt": "x", "stream": "yes"}', '"stream" must be true or false; got "yes".', 'stream'),
    (b'{"prompt": "x", "stop": [1, 2]}', '"stop" must be a string or a list of at most 4 strings; got [1, 2].', 'stop'),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 'at most 4 strings', 'stop'),
    (json.dumps({'prompt': 'word ' * 80}).encode(), "exceed the model's context of 64 tokens", 'prompt'),
])
def test_bad_requests_get_one_clear_400(server, body, message, param):
  client, _ = server
  response = client.post('/v1/completions', content=body, headers={'Content-Type': 'application/json'})
  assert response.status_code == 400, response.text
  error = response.json()['error']  # OpenAI's error shape
  assert message in error['message'] and error['param'] == param, response.text
  assert error['type'] == 'invalid_request_error' and set(error) == {'message', 'type', 'param', 'code'}


def test_a_body_without_content_type_is_read_as_json_and_a_text_one_refused(server):
  client, _ = server
  without = client.post('/v1/completions', content=b'{"prompt": "x", "max_tokens": 2}', headers={'Content-Type': ''})
  assert without.status_code == 200, without.text
  as_text = client.post('/v1/completions', content=b'{"prompt": "x"}', headers={'Content-Type': 'text/plain'})
  assert as_text.status_code == 400 and 'Content-Type: application/json' in as_text.json()['error']['message']


def test_api_key_is_required(server):
  client, _ = server
  url = str(client.base_url)
  for headers in ({}, {'Authorization': 'Bearer wrong'}):
    for body in (b'{"prompt": "x"}', b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": '):
      response = httpx.post(f'{url}/v1/completions', content=body,
                            headers={**headers, 'Content-Type': 'application/json'})
      error = response.json()['error']
      assert response.status_code == 401 and 'API key' in error['message'] and error['code'] == 'invalid_api_key'


def test_one_bad_request_does_not_fail_the_others_sent_with_it(server):
  client, _ = server
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


def test_a_failed_batch_answers_its_own_requests_and_the_worker_goes_on(loaded_run):
  loaded, tokenizer = loaded_run
  engine = Engine(loaded, tokenizer, max_batch=1, queue_size=4, chunk_tokens=8)

  async def answers():
    loop = asyncio.get_running_loop()
    # A prompt that is not text fails its batch inside the tokenizer, past every check a request goes through.
    broken, good = Job(None, Sampling(max_new_tokens=4), loop), Job('def ', Sampling(max_new_tokens=4), loop)
    engine.submit(broken)
    engine.submit(good)
    failure = await asyncio.wait_for(broken.events.get(), 120)
    deltas = [await asyncio.wait_for(good.events.get(), 120)]
    while not isinstance(deltas[-1], Exception) and deltas[-1].finish_reason is None:
      deltas.append(await asyncio.wait_for(good.events.get(), 120))
    return failure, deltas

  failure, deltas = asyncio.run(answers())
  assert isinstance(failure, Exception)
  expected = complete(loaded.model, loaded.params, tokenizer, ['def '], Sampling(max_new_tokens=4))[0]
  assert ''.join(d.text for d in deltas) == expected.text and deltas[-1].finish_reason == expected.finish_reason


def test_fifty_concurrent_requests_are_all_answered(server):
  client, _ = server
  requests = [{'prompt': f'def f{i}(', 'max_tokens': 6 + i % 5, 'temperature': 0.7, 'seed': i} for i in range(50)]
  with concurrent.futures.ThreadPoolExecutor(50) as pool:
    responses = list(pool.map(lambda r: client.post('/v1/completions', json=r), requests))
  assert [r.status_code for r in responses] == [200] * 50
  # Batched with others, each request gets what it gets alone.
  for i in (0, 17, 49):
    alone = client.post('/v1/completions', json=requests[i]).json()['choices'][0]['text']
    assert responses[i].json()['choices'][0]['text'] == alone


def test_flagged_prompt_and_output_carry_their_flags(server, flagged_word):
  client, _ = server
  word, expected_text = flagged_word
  flagged_prompt = client.post('/v1/completions', json={'prompt': FLAGGED_PROMPT, 'max_tokens': 4}).json()
  assert flagged_prompt['safety']['prompt']['profane'] and flagged_prompt['safety']['prompt']['words'] == ['zorblax']
  body = client.post('/v1/completions', json={'prompt': OUTPUT_PROMPT, 'max_tokens': 24, 'temperature': 1.0,
                                               'seed': 3}).json()
  assert body['choices'][0]['text'] == expected_text  # flag mode: the text is returned
  assert not body['safety']['prompt']['profane']
  assert body['safety']['output']['profane'] and word.lower() in body['safety']['output']['words']


def test_block_mode_and_a_full_queue(trained_run, flagged_word):
  word, _ = flagged_word
  process, url = _start(trained_run, f'--blocked_words=zorblax,{word}', '--safety=block', '--max_batch=1',
                        '--queue_size=1', '--chunk_tokens=1')
  try:
    with httpx.Client(base_url=url, timeout=120) as client:
      refused = client.post('/v1/completions', json={'prompt': FLAGGED_PROMPT, 'max_tokens': 4})
      assert refused.status_code == 400 and 'flagged by the safety checker' in refused.json()['error']['message']
      withheld = client.post('/v1/completions', json={'prompt': OUTPUT_PROMPT, 'max_tokens': 24,
                                                      'temperature': 1.0, 'seed': 3}).json()
      assert withheld['choices'][0] == {'text': '', 'index': 0, 'logprobs': None, 'finish_reason': 'content_filter'}
      # One decoding, one waiting: the rest of 12 simultaneous requests are turned away, none left hanging.
      with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: client.post('/v1/completions', json={
            'prompt': 'import', 'max_tokens': 40, 'temperature': 1.0, 'seed': i}).status_code, range(12)))
      assert set(statuses) == {200, 503} and statuses.count(200) >= 2
  finally:
    output = _stop(process)
  assert 'flagged prompt' in output and 'flagged output' in output
