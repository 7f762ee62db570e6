"""The train step, optimizer and checkpoints, in-process on one CPU device."""

import jax
import numpy as np

from jaxgpt import sharding, state as state_lib

from jaxgpt.model import build_model
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.data import builder, pipeline
from jaxgpt.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxgpt.metrics import TrainingClock
from jaxgpt.train import make_train_step


def _setup(config, accum=1):
  config.optim.grad_accum_steps = accum
  data = builder.prepare(config.data, log=lambda m: None)
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, data.tokenizer.vocab_size)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = state_lib.create_state(model, tx, config.seq_len, mesh, jax.random.key(0))
  step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config.optim, config.train.num_steps), accum))
  batches = pipeline.make_iterator(data.chunks('train', config.seq_len + 1), seq_len=config.seq_len, seed=0, shuffle=True,
                                   local_batch_size=config.batch_size)
  return data, mesh, model, tx, state, step, batches


def test_a_tiny_model_overfits_one_batch(tiny_config):
  tiny_config.optim.lr, tiny_config.optim.warmup_steps, tiny_config.optim.weight_decay = 1e-2, 1, 0.0
  tiny_config.train.num_steps = 150
  _, _, _, _, state, step, batches = _setup(tiny_config)
  batch = next(batches)
  losses = []
  for _ in range(150):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[0] > 5.0  # about log(vocab) at the start
  assert losses[-1] < 0.5, losses[-10:]


def _largest_change(before, after) -> float:
  return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(before),
                                                                             jax.tree.leaves(after)))


def test_the_first_update_moves_the_weights_by_the_first_learning_rate(tiny_config):
  _, _, _, _, state, step, batches = _setup(tiny_config)
  initial = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, next(batches))
  first_lr = tiny_config.optim.lr / tiny_config.optim.warmup_steps
  np.testing.assert_allclose(float(metrics['learning_rate']), first_lr, rtol=1e-6)
  # Adam's first update is about +-lr on every weight with a gradient (decay adds lr * wd * w).
  np.testing.assert_allclose(_largest_change(initial, state.params), first_lr, rtol=0.2)


def test_gradient_accumulation_matches_one_big_batch(tiny_config):
  results = []
  for accum in (1, 4):
    _, _, _, _, state, step, batches = _setup(tiny_config, accum)
    initial = jax.tree.map(np.asarray, state.params)
    batch = next(batches)
    state, metrics = step(state, batch)
    results.append((float(metrics['loss']), float(metrics['grad_norm']), state.params))
  (loss1, norm1, params1), (loss4, norm4, params4) = results
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  np.testing.assert_allclose(norm1, norm4, rtol=1e-4)
  # The step moved the weights (by about lr, 1e-3) far more than the tolerance below, so equal params mean
  # equal updates; Adam's first update is about sign(gradient), so float noise in gradients near 0 shows as
  # a few 1e-6 differences.
  assert _largest_change(initial, params1) > 50 * 1e-5
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_weight_decay_skips_norms_biases_and_embeddings(tiny_config):
  data, _, _, _, state, _, _ = _setup(tiny_config)
  mask = weight_decay_mask(state.params, decay_embeddings=False)
  assert mask['blocks']['query'] and mask['blocks']['mlp_up']
  assert not mask['blocks']['query_bias'] and not mask['blocks']['ln_attn']['scale']
  assert not mask['token_embedding'] and not mask['ln_final']['bias']
  assert weight_decay_mask(state.params, decay_embeddings=True)['token_embedding']


def test_schedule_warms_up_then_decays_to_the_floor(tiny_config):
  cfg = tiny_config.optim
  schedule = learning_rate_schedule(cfg, 100)
  # Step s (from 0) makes update s + 1: the first moves by lr / warmup_steps, the last by the floor.
  np.testing.assert_allclose(float(schedule(0)), cfg.lr / cfg.warmup_steps, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1)), 2 * cfg.lr / cfg.warmup_steps, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(cfg.warmup_steps - 1)), cfg.lr, rtol=1e-6)
  # Then a cosine from the peak (update warmup_steps) to the floor (update 100): a linear decay is 1.4% lower here.
  floor, progress = cfg.lr * cfg.min_lr_ratio, (51 - cfg.warmup_steps) / (100 - cfg.warmup_steps)
  np.testing.assert_allclose(float(schedule(50)), floor + (cfg.lr - floor) * (1 + np.cos(np.pi * progress)) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(float(schedule(99)), cfg.lr * cfg.min_lr_ratio, rtol=1e-6)


def test_checkpoint_round_trip_restores_state_and_data_position(tiny_config, tmp_path):
  data, mesh, model, tx, state, step, batches = _setup(tiny_config)
  for _ in range(3):
    state, _ = step(state, next(batches))
  checkpointer = Checkpointer(str(tmp_path), keep=2)
  meta = state_lib.checkpoint_meta(tiny_config, data.tokenizer)
  checkpointer.save(3, state, batches, meta)
  checkpointer.wait()
  expected_batch = next(batches)

  fresh_batches = pipeline.make_iterator(data.chunks('train', tiny_config.seq_len + 1), seq_len=tiny_config.seq_len, seed=0,
                                         shuffle=True, local_batch_size=tiny_config.batch_size)
  abstract = state_lib.abstract_state(model, tx, tiny_config.seq_len, mesh)
  restored = Checkpointer(str(tmp_path), keep=2).restore(3, abstract, fresh_batches)
  assert int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
  got_batch = next(fresh_batches)
  for key in expected_batch:
    np.testing.assert_array_equal(got_batch[key], expected_batch[key])
  assert checkpointer.read_meta(3)['tokenizer_fingerprint'] == data.tokenizer.fingerprint


def test_chunked_loss_gives_the_same_training_step(tiny_config):
  results = []
  for chunk in (0, 128):
    tiny_config.model.loss_chunk = chunk
    _, _, _, _, state, step, batches = _setup(tiny_config)
    initial = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, next(batches))
    results.append((float(metrics['loss']), state.params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  # Adam divides by the gradient's root mean square, which lifts float32 rounding in tiny gradients to ~1e-6.
  tolerance = 5e-6
  assert _largest_change(initial, results[1][1]) > 100 * tolerance  # the step moved the weights beyond it
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=tolerance)


def test_the_training_clock_leaves_out_paused_time():
  now = [0.0]
  clock = TrainingClock(clock=lambda: now[0])
  for _ in range(4):  # 4 steps of 1 s, a 10 s save after the second
    now[0] += 1.0
    clock.step()
    if clock.steps == 2:
      with clock.paused():
        now[0] += 10.0
  assert clock.take() == (4, 4.0)
  now[0] += 3.0
  clock.step()
  assert clock.take() == (1, 3.0)  # a new interval, nothing paused in it


def test_throughput_is_the_same_whatever_the_eval_and_checkpoint_intervals(tiny_config, trained_run, tmp_path):
  """Saves and validations between two logs once shortened the interval's time but not its step count."""
  import json
  import os
  from jaxgpt.train import train
  tiny_config.train.update(num_steps=10, log_every=5, checkpoint_every=2, eval_every=3)
  frequent = train(tiny_config, str(tmp_path / 'run'))
  # trained_run: the same model and data, saving and validating only at log steps.
  reference = json.load(open(os.path.join(trained_run, 'results.json')))
  # Counting only the time since the last save or validation made this ratio about 0.2. The writes of
  # frequent async saves do slow the steps (real time, counted: 2.5x seen on 2 cores), so only the
  # lower bound is tight.
  assert frequent['seconds_per_step'] / reference['seconds_per_step'] > 0.5
