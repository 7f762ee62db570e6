"""KV-cache decoding: the same numbers as the full forward pass, for every architecture option."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LLAMA_OPTIONS, architecture_variants, run_module
from jaxgpt.config import JaxgptError
from jaxgpt.model import GPT, ModelConfig, init_cache, unscanned
from jaxgpt.sample import (DEFAULT_MAX_NEW_TOKENS, Sampling, _cutoffs, fitting_max_new_tokens, generate, sample_tokens,
                           stream)

CFG = ModelConfig(vocab_size=97, max_len=48, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64)
VARIANTS = {
    **architecture_variants(CFG),
    'gpt2_unscanned': dataclasses.replace(CFG, scan_layers=False),
    'llama_unscanned_remat': dataclasses.replace(CFG, scan_layers=False, remat='full', **LLAMA_OPTIONS),
}
EOS = 2
PROMPTS = [[1, 5, 17, 33], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1]]


def _init(cfg=CFG):
  """Parameters with a larger spread than the training init, so greedy decoding does not just repeat."""
  model = GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  return model, jax.tree.map(lambda x: x * 8.0, params)


@pytest.mark.parametrize('cfg', VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(cfg):
  model, params = _init(cfg)
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
  full_BxTxV = jax.jit(model.apply)({'params': params}, tokens_BxT)
  decoder, decoder_params = unscanned(model, params)
  apply_cached = jax.jit(lambda tokens, positions, cache: decoder.apply(
      {'params': decoder_params}, tokens, positions_BxT=positions, cache=cache))
  # Prefill 7 tokens (the model as trained, returning each layer's keys and values for the cache's first
  # slots), feed 3 through the cache at once, then the rest one at a time.
  logits, kv = jax.jit(lambda tokens: model.apply({'params': params}, tokens, prefill=True))(tokens_BxT[:, :7])
  cache = {name: tuple(empty.at[:, :, :7].set(new) for empty, new in zip(layers, kv[name]))
           for name, layers in init_cache(cfg, 2, 32).items()}
  positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
  pieces = [logits]
  for start, end in [(7, 10), *((t, t + 1) for t in range(10, 20))]:
    logits, cache = apply_cached(tokens_BxT[:, start:end], positions[:, start:end], cache)
    pieces.append(logits)
  cached_BxTxV = jnp.concatenate(pieces, axis=1)
  scale = float(jnp.abs(full_BxTxV).max())
  assert scale > 1.0  # logits large enough to show a difference
  # fp32 rounding, amplified by the large weights: each path alone is up to 2e-5 of the largest logit off a
  # float64 forward pass (measured), and the two round differently. A wrong mask, slot or head moves logits by ~1.
  np.testing.assert_allclose(cached_BxTxV, full_BxTxV, atol=5e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize('name', ['llama', 'gpt2_unscanned'])
def test_greedy_output_is_the_same_with_and_without_the_cache(name):
  model, params = _init(VARIANTS[name])
  sampling = Sampling(max_new_tokens=24)
  cached = generate(model, params, PROMPTS, sampling, eos_id=EOS)
  uncached = generate(model, params, PROMPTS, sampling, eos_id=EOS, use_cache=False)
  assert [c.tokens for c in cached] == [u.tokens for u in uncached]
  assert all(len(c.tokens) == 24 and c.finish_reason == 'length' for c in cached)
  assert len({t for c in cached for t in c.tokens}) > 5  # not one token repeated


def test_a_batch_gives_each_prompt_the_result_it_gets_alone():
  model, params = _init(VARIANTS['llama'])
  # Every row with its own settings: greedy, temperature, top-k, top-p, lengths, seeds.
  samplings = [Sampling(max_new_tokens=20), Sampling(max_new_tokens=9, temperature=1.0, top_k=5, seed=3),
               Sampling(max_new_tokens=15, temperature=0.8, top_p=0.9, seed=4)]
  batched = generate(model, params, PROMPTS, samplings, eos_id=EOS)
  alone = [generate(model, params, [p], s, eos_id=EOS)[0] for p, s in zip(PROMPTS, samplings)]
  assert [b.tokens for b in batched] == [a.tokens for a in alone]
  assert [len(b.tokens) for b in batched] == [20, 9, 15]


def test_seed_decides_the_sample():
  model, params = _init()
  def run(seed):
    return generate(model, params, PROMPTS[:1], Sampling(max_new_tokens=16, temperature=1.0, seed=seed),
                    eos_id=EOS)[0].tokens
  assert run(7) == run(7)
  assert run(7) != run(8)


def test_stop_sequences_and_eos_end_a_row_and_are_not_returned():
  model, params = _init()
  greedy = generate(model, params, PROMPTS, Sampling(max_new_tokens=20), eos_id=EOS)
  stop = greedy[0].tokens[5:7]  # the greedy continuation of row 0 contains this pair
  stopped = generate(model, params, PROMPTS, Sampling(max_new_tokens=20), eos_id=EOS,
                     stop_tokens=[[stop], [], []])
  tokens = greedy[0].tokens
  first = next(i for i in range(len(tokens)) if tokens[i:i + 2] == stop)
  assert stopped[0].tokens == tokens[:first] and stopped[0].finish_reason == 'stop'
  assert stopped[1].tokens == greedy[1].tokens  # other rows are untouched
  # The same token as EOS: the row ends before it.
  eos = greedy[1].tokens[3]
  ended = generate(model, params, PROMPTS[1:2], Sampling(max_new_tokens=20), eos_id=eos)[0]
  assert ended.tokens == greedy[1].tokens[:greedy[1].tokens.index(eos)] and ended.finish_reason == 'stop'


def test_streaming_in_chunks_yields_the_same_tokens():
  model, params = _init()
  sampling = Sampling(max_new_tokens=21, temperature=0.7, seed=1)
  whole = generate(model, params, PROMPTS, sampling, eos_id=EOS)
  pieces = [[] for _ in PROMPTS]
  chunks = 0
  for deltas in stream(model, params, PROMPTS, sampling, eos_id=EOS, chunk=4):
    chunks += 1
    for row, delta in enumerate(deltas):
      pieces[row] += delta.tokens
  assert chunks == 6 and pieces == [w.tokens for w in whole]


def test_top_k_and_top_p_limit_the_candidates():
  logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 400))
  keys_B = jax.random.split(jax.random.key(0), 400)
  def draw(temperature, top_k, top_p):
    return set(np.asarray(jax.jit(sample_tokens)(logits_BxV, keys_B, jnp.full(400, temperature),
                                                 jnp.full(400, top_k), jnp.full(400, top_p))).tolist())
  assert draw(1.0, 0, 1.0) == {0, 1, 2, 3}
  assert draw(1.0, 2, 1.0) == {0, 1}
  assert draw(1.0, 0, 0.7) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert draw(1.0, 0, 0.85) == {0, 1, 2}
  assert draw(0.0, 0, 1.0) == {0}



def test_cut_offs_are_the_full_sorts_whether_or_not_they_lie_among_the_top_candidates():
  """sample_tokens finds top-k and top-p cut-offs among the 64 largest logits when all rows' lie there, else sorts."""
  V = 1000
  # Sharp rows (x8) hold their mass in a few tokens; a flat row's (x0.5) 0.9 nucleus spans hundreds.
  logits_BxV = np.random.default_rng(0).normal(size=(5, V)).astype(np.float32) * np.array([[8, 8, 8, 0.5, 8]]).T
  top_k_B, top_p_B = np.array([10, 0, 0, 0, 200]), np.array([1, 0.9, 0.5, 0.9, 1], np.float32)
  descending_BxV = -np.sort(-logits_BxV, axis=-1)
  probs_BxV = np.exp(descending_BxV - descending_BxV[:, :1])
  first_B = (np.cumsum(probs_BxV / probs_BxV.sum(-1, keepdims=True), axis=-1) < top_p_B[:, None]).sum(-1)
  expected_B = np.array([descending_BxV[0, 9], descending_BxV[1, first_B[1]], descending_BxV[2, first_B[2]],
                         descending_BxV[3, first_B[3]], descending_BxV[4, 199]])
  assert first_B[3] > 64 and first_B[1] < 64  # the flat row needs the sort; row 4's k = 200 too
  for rows in ([0, 1, 2], [0, 1, 2, 3, 4]):  # all within the top 64, then not
    cutoffs_B = jax.jit(_cutoffs)(logits_BxV[rows], top_k_B[rows], top_p_B[rows])
    np.testing.assert_array_equal(np.asarray(cutoffs_B)[:, 0], expected_B[rows])
  assert np.asarray(jax.jit(_cutoffs)(logits_BxV[:1], np.zeros(1, int), np.ones(1)))[0, 0] == -np.inf

@pytest.mark.parametrize('sampling,prompts,message', [
    (Sampling(max_new_tokens=48), PROMPTS, 'max_new_tokens=48 must be between 1 and 47'),
    (Sampling(max_new_tokens=4), [[1], []], 'a prompt is empty'),
])
def test_bad_requests_are_one_clear_error(sampling, prompts, message):
  model, params = _init()
  with pytest.raises(JaxgptError, match=message):
    generate(model, params, prompts, sampling, eos_id=EOS)


@pytest.mark.parametrize('settings,message', [
    ({'seed': 2**32}, 'seed=4294967296 must be an integer from 0 to 4294967295'),
    ({'seed': -1}, 'seed=-1 must be an integer from 0 to 4294967295'),
    ({'temperature': -0.5}, 'temperature=-0.5 must not be negative'),
    ({'temperature': float('nan')}, 'temperature=nan must not be negative'),
    ({'top_p': 0.0}, r'top_p=0.0 must be in \(0, 1\]'),
    ({'top_p': 1.5}, r'top_p=1.5 must be in \(0, 1\]'),
    ({'top_k': -1}, 'top_k=-1 must not be negative'),
    ({'max_new_tokens': 0}, 'max_new_tokens=0 must be at least 1'),
])
def test_settings_that_cannot_decode_are_refused_when_made(settings, message):
  # Refused before any batch: in `generate` a uint32 seed out of range would fail every row decoded with it.
  with pytest.raises(JaxgptError, match=message):
    Sampling(**settings)


def test_the_edges_of_the_valid_settings_are_accepted():
  model, params = _init()
  edges = [Sampling(max_new_tokens=1, seed=2**32 - 1, temperature=1.0, top_p=1.0),
           Sampling(max_new_tokens=2, seed=0, temperature=0.0, top_k=0, top_p=1e-6)]
  assert [len(c.tokens) for c in generate(model, params, PROMPTS[:2], edges, eos_id=-1)] == [1, 2]


def test_the_default_length_fits_the_context_and_an_explicit_one_must():
  assert fitting_max_new_tokens(None, 1024, 10) == (DEFAULT_MAX_NEW_TOKENS, '')
  fitting, note = fitting_max_new_tokens(None, 64, 10)
  assert fitting == 54 and 'max_new_tokens=54' in note and '--max_new_tokens' in note
  assert fitting_max_new_tokens(None, 128, 1)[0] == 127
  assert fitting_max_new_tokens(200, 1024, 900) == (200, '')  # the prompt keeps its end, as asked
  with pytest.raises(JaxgptError, match='max_new_tokens=128 must be between 1 and 127'):
    fitting_max_new_tokens(128, 128, 4)
  with pytest.raises(JaxgptError, match='the prompt is 64 tokens and fills the model.s context of 64'):
    fitting_max_new_tokens(None, 64, 64)


def test_the_readme_sample_command_works_on_a_small_run(trained_run):
  # README, right after the quickstart: no --max_new_tokens, on a run whose context (64) is below the default.
  result = run_module('jaxgpt.sample', '--workdir', trained_run, '--prompt', 'def fibonacci(', '--temperature', '0.5')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('# step 10 of') and 'def fibonacci(' in result.stdout
  notes = [line for line in result.stderr.splitlines() if line.startswith('max_new_tokens=')]
  assert len(notes) == 1 and "model's context of 64 tokens" in notes[0], result.stderr[-2000:]


def test_a_long_prompt_keeps_its_end():
  model, params = _init()
  long_prompt = list(range(3, 3 + 60))  # longer than the 48-token context
  out = generate(model, params, [long_prompt], Sampling(max_new_tokens=8), eos_id=EOS)[0]
  tail = generate(model, params, [long_prompt[-40:]], Sampling(max_new_tokens=8), eos_id=EOS)[0]
  assert out.tokens == tail.tokens and len(out.tokens) == 8
