"""Training: `python -m jaxgpt.train --config configs/X.py --workdir DIR [--config.a.b=value]`.

Raw text -> tokenizer + TFDS dataset (cached) -> Grain batches -> one jitted,
sharded train step with donated state -> periodic validation, async Orbax
checkpoints and logs -> samples at the end. Running again with the same
workdir resumes from the latest checkpoint, data position included.
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from jax.experimental import multihost_utils

from jaxgpt import hf, inference, lora, paths, preference, run_dir, run_lock, sharding, state as state_lib, stopping
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import JaxgptError, define_config_flag, require_config, run_cli, validate
from jaxgpt.data import builder, mixture, pipeline, preference as preference_data
from jaxgpt.evaluation import eval_sums, generation_metrics, held_out_metrics, loss_scope, read_references
from jaxgpt.metrics import (METRICS_FILE, RESULTS_FILE, MetricWriter, StepMetrics, TrainingClock, format_duration,
                            model_flops_utilization, peak_flops_per_device)
from jaxgpt.model import GPT, build_model, flops_per_token, loss_sums, num_params
from jaxgpt.optim import learning_rate_schedule, make_optimizer
from jaxgpt.preemption import StopSignals
from jaxgpt.sample import Sampling, complete


def make_train_step(model, tx, schedule, accum_steps: int, seed: int = 0, lora_cfg=None, dpo_cfg=None):
  """The step. With LoRA settings, state.params are the adapters and `frozen` the base params they adapt. With
  DPO settings, batches are preference pairs and the loss DPO's (jaxgpt/preference.py) against `frozen` as the
  reference: the init_from model (with LoRA, the base itself with the adapters off: no second copy)."""
  def train_step(state, batch, frozen=None):
    # The step's dropout key derives from the seed and the step alone: no RNG state to
    # checkpoint, and a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_of(trainable, microbatch, micro_rng):
      """(loss sum, (count, sums of the objective's other figures)): sums, so that microbatches add up."""
      params = trainable
      if lora_cfg is not None:
        micro_rng, adapter_rng = jax.random.split(micro_rng)
        params = lora.merge(frozen, trainable, lora_cfg, adapter_rng)
      if dpo_cfg is not None:
        return preference.dpo_sums(model, params, frozen, microbatch, dpo_cfg, micro_rng)
      loss_sum, count = loss_sums(model, params, microbatch, micro_rng)
      return loss_sum, (count, {})

    def grads_of(microbatch, micro_rng):
      (loss_sum, (count, sums)), grads = jax.value_and_grad(
          lambda p: loss_of(p, microbatch, micro_rng), has_aux=True)(state.params)
      return loss_sum, count, sums, grads

    if accum_steps == 1:
      loss_sum, count, sums, grad_sum = grads_of(batch, rng)
    else:
      # Row i of microbatch j is row i * accum + j of the batch: each device keeps its own rows.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, xs):
        microbatch, j = xs
        return jax.tree.map(jnp.add, carry, grads_of(microbatch, jax.random.fold_in(rng, j))), None

      shapes = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      (loss_sum, count, sums, grad_sum), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))

    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    loss, grad_norm = loss_sum / count, optax.global_norm(grads)
    # A non-finite loss, gradient or update (a bad batch, an overflow, a bad learning rate) is not
    # applied: params and Adam's moments stay as they were, decided here on the device so that
    # no step waits for the host. The step still counts: its batch has been consumed, and the
    # optimizer's integer step counts advance with it, so the learning-rate schedule stays on
    # `state.step` instead of lagging by the skipped steps.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep_finite = lambda new, old: jax.tree.map(
        lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) else jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1,
                              params=keep_finite(optax.apply_updates(state.params, updates), state.params),
                              opt_state=keep_finite(opt_state, state.opt_state))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step), 'finite': finite,
               **{name: value / count for name, value in sums.items()}}
    return new_state, metrics

  return train_step


def _log_pairs(writer, pairs: dict, seq_len: int) -> None:
  """How many preference pairs each split gives rows of seq_len tokens, and what did not fit; none is an error."""
  for split, rows in pairs.items():
    writer.log(f'data: {len(rows):,} {split} preference pairs'
               + (f'; {rows.truncated:,} longer than seq_len + 1 = {seq_len + 1} tokens lost the start of their '
                  'prompt' if rows.truncated else '')
               + (f'; {rows.dropped:,} left out, their responses alone longer than that' if rows.dropped else ''))
    if not len(rows):
      raise JaxgptError(f'no {split} preference pair fits rows of seq_len={seq_len} tokens: their responses alone '
                        'are longer. Raise seq_len (and model.max_len), or shorten the responses.')


def _log_validation(writer, step: int, results: dict, whole_split: bool, scope: str) -> None:
  where = 'the whole held-out split' if whole_split else 'a sample of the held-out split'
  writer.log(f'step {step}: validation loss {results["loss"]:.3f} | perplexity {results["perplexity"]:.2f} '
             f'| {results["bits_per_byte"]:.3f} bits/byte ({results["tokens"]:,} tokens, {results["bytes"]:,} bytes, '
             f'{where}; {scope})')
  writer.scalars(step, {f'val/{k}': v for k, v in results.items() if k not in ('tokens', 'bytes')})


def _use_compilation_cache(directory: str) -> None:
  """XLA's persistent compilation cache in `directory`, local or in a bucket (JAX reads and writes both).

  JAX writes it from process 0 alone, so on a pod a host-local directory helps only process 0's host: a
  shared one (gs://...) lets every host load what process 0 compiled.
  """
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if jax.process_count() > 1 and not paths.is_remote(directory):
    logging.warning('train.compilation_cache_dir=%s is local to each host, and JAX writes it from process 0 only: '
                    'the other hosts compile every time. Put it in the bucket (gs://...) to share it.', directory)


def _check_tokenizer(workdir: str, tokenizer) -> None:
  """Refuses a workdir whose run used another tokenizer."""
  old = run_dir.saved_tokenizer(workdir)
  if old is not None and old.fingerprint != tokenizer.fingerprint:
    raise JaxgptError(
        f'{workdir} belongs to a run with a different tokenizer ({old.fingerprint}, now '
        f'{tokenizer.fingerprint}): the data settings changed. Use the same data settings as '
        'that run, or a new --workdir.')


def _num_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_free_space(workdir: str, abstract_state) -> None:
  """Refuses to start when the next checkpoint would not fit, rather than failing at the first save. Local disks
  only: a bucket has no free space to read."""
  needed = _num_bytes(abstract_state)
  free = paths.free_bytes(workdir)
  if free is not None and free < needed:
    raise JaxgptError(
        f'--workdir {workdir} has {free / 1e9:.2f} GB free, but one checkpoint of this model (parameters and '
        f'optimizer state) takes {needed / 1e9:.2f} GB. Free some space or choose another --workdir.')


@dataclasses.dataclass
class Run:
  """What the training loop works with; `set_up` builds it."""
  config: ml_collections.ConfigDict
  workdir: str
  writer: MetricWriter
  mesh: jax.sharding.Mesh
  rules: tuple
  data: builder.PreparedData | mixture.PreparedMixture
  model: GPT
  checkpointer: Checkpointer
  lock: run_lock.RunLock  # this workdir is ours until `train` returns
  meta: dict
  train_batches: pipeline.BatchIterator
  train_step: Callable  # (state, batch, frozen) -> (state, metrics); jitted, state donated
  eval_step: Callable  # (params, batch) -> evaluation.eval_sums (DPO: preference.eval_sums)
  references: list  # eval.references examples for BLEU/ROUGE at each validation
  tokens_per_step: int  # through the model: DPO's batches hold two rows per pair
  # The frozen params, an argument of every step: LoRA's base, DPO's reference (init_from: with LoRA, that base).
  frozen: Any = None
  merge: Callable | None = None  # LoRA: (frozen, adapters) -> params
  held_out_pairs: Any = None  # DPO: the validation split's preference pairs (data.preference.PairRows)
  epoch_steps: float = 0.0  # steps in one pass over the training split
  model_flops: float = 0.0  # per token
  peak_flops: float = 0.0  # per device

  def model_params(self, state):
    """The params the model runs with: for LoRA, the base with the adapters merged in."""
    return state.params if self.merge is None else self.merge(self.frozen, state.params)


def set_up(config, workdir: str):
  """Checks the config and workdir, prepares the data, and builds (or restores) the state.

  Returns (run, state, first step). Every check that can fail runs before the
  first training step, so mistakes surface in seconds, not at the first save.
  """
  validate(config)
  lora.check_config(config)
  preference.check_config(config)
  lora_cfg, dpo_cfg = lora.settings(config), preference.settings(config)
  sharding.initialize_distributed(config.distributed)
  if config.train.compilation_cache_dir:
    _use_compilation_cache(paths.expand(config.train.compilation_cache_dir))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_divisibility(config, mesh.shape)
  paths.check_writable(workdir, '--workdir')  # every process: a bucket or credentials missing on any host fail here
  lock = run_lock.acquire(workdir)  # before anything writes to the workdir
  writer = MetricWriter(workdir, config)
  # Fine-tuning: the data is tokenized with the base model's own tokenizer.
  base = inference.load_base(config) if config.init_from else None
  base_tokenizer = base.tokenizer if base else None
  if jax.process_index() == 0:  # one process builds the shared data cache; the others then reuse it
    data = builder.prepare(config.data, log=writer.log, tokenizer=base_tokenizer)
  multihost_utils.sync_global_devices('jaxgpt data prepared')
  if jax.process_index() != 0:
    data = builder.prepare(config.data, log=writer.log, tokenizer=base_tokenizer)
  tokenizer = data.tokenizer
  _check_tokenizer(workdir, tokenizer)

  model = build_model(config, tokenizer.vocab_size)
  pairs = None
  if dpo_cfg is not None:
    pairs = {split: data.pairs(split, config.seq_len) for split in ('train', 'validation')}
    _log_pairs(writer, pairs, config.seq_len)
  per_epoch = stopping.steps_per_epoch(config, data.report['train']['tokens'], pairs and len(pairs['train']))
  steps = stopping.resolve_num_steps(config, per_epoch, writer.log)
  tx = make_optimizer(config.optim, steps)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, keep_every=config.train.keep_every)
  meta = state_lib.checkpoint_meta(config, tokenizer)
  # Read now, so that a bad references file fails before training rather than at the first validation.
  references = read_references(config.eval.references)[:config.eval.max_examples] if config.eval.references else []
  make_train_batches = lambda seed: pipeline.make_iterator(
      data.chunks('train', config.seq_len + 1), seq_len=config.seq_len, seed=seed,
      shuffle=config.data.shuffle, local_batch_size=config.batch_size // jax.process_count())
  if dpo_cfg is not None:
    make_train_batches = lambda seed: preference_data.make_iterator(
        pairs['train'], seed=seed, shuffle=config.data.shuffle,
        local_batch_size=config.batch_size // jax.process_count())
  train_batches = make_train_batches(config.seed)

  abstract = state_lib.abstract_state(model, tx, config.seq_len, mesh, rules, lora_cfg)
  _check_free_space(workdir, abstract)
  restored = checkpointer.restore_latest(abstract, train_batches, meta, writer.log)
  if restored is None:
    start = 0
    state = state_lib.create_state(model, tx, config.seq_len, mesh, jax.random.key(config.seed), rules, lora_cfg)
    if base is not None and lora_cfg is None:  # the base model's weights, placed as the random ones were
      state = state.replace(params=jax.device_put(hf.params_in_layout(base.params, config.model.scan_layers),
                                                  jax.tree.map(lambda x: x.sharding, state.params)))
      writer.log(f'initialised from {config.init_from}')
  else:
    start, state = restored
    writer.log(f'resumed from step {start} in {checkpointer.directory}')
    saved_by = checkpointer.data_saved_by_other_process_count(start)
    if saved_by:
      # Each process saved its own position in its own slice of the data; with another process
      # count the slices differ, so the positions mean nothing. A new shuffle, seeded by the step.
      train_batches = make_train_batches(config.seed + start)
      writer.log(f'warning: step {start} was saved by {saved_by} processes and this run has '
                 f'{jax.process_count()}: the model and optimizer resume exactly, but the data order '
                 'starts a new shuffle, so some documents come round again before others are seen. '
                 f'Resume with {saved_by} processes to continue the data exactly.')
  if jax.process_index() == 0:  # what sample, evaluate and serve read; written once resuming is known to work
    run_dir.write_run_files(workdir, config, tokenizer)

  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  param_shardings = state_lib.state_shardings(model, tx, config.seq_len, mesh, rules).params
  frozen = merge = None
  if lora_cfg is not None or dpo_cfg is not None:
    frozen = jax.device_put(hf.params_in_layout(base.params, config.model.scan_layers), param_shardings)
  if lora_cfg is not None:
    merge = jax.jit(lambda base_params, adapters: lora.merge(base_params, adapters, lora_cfg),
                    out_shardings=param_shardings)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(
      make_train_step(model, tx, learning_rate_schedule(config.optim, steps), config.optim.grad_accum_steps,
                      config.seed + 1, lora_cfg, dpo_cfg),
      in_shardings=(state_shardings, batch_sharding, None if frozen is None else param_shardings),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  token_bytes = tokenizer.token_bytes()
  if dpo_cfg is None:
    eval_step = jax.jit(lambda params, batch: eval_sums(model, params, batch, token_bytes),
                        in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
  else:
    pair_sums = jax.jit(
        lambda params, batch, reference: preference.eval_sums(model, params, reference, batch, dpo_cfg, token_bytes),
        in_shardings=(param_shardings, batch_sharding, param_shardings), out_shardings=replicated)
    eval_step = lambda params, batch: pair_sums(params, batch, frozen)

  # DPO runs each row through the reference model too: a forward pass, a third of a training step's work.
  model_flops = flops_per_token(model.cfg, config.seq_len) * (1 if dpo_cfg is None else 4 / 3)
  peak, peak_source = peak_flops_per_device(config.train.peak_flops_per_device)
  trained = num_params(state.params)
  total = trained if frozen is None else num_params(frozen)
  writer.log(f'model: {total / 1e6:.2f}M parameters, {model_flops / 1e6:.1f} MFLOPs/token; '
             f'mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s per device ({peak_source})')
  if lora_cfg is not None:
    writer.log(f'LoRA rank {lora_cfg.rank} on {", ".join(lora_cfg.targets)}: {trained:,} trained parameters '
               f'({100 * trained / total:.2f}%); the base at {config.init_from} stays frozen')
  if dpo_cfg is not None:
    writer.log(f'DPO ({dpo_cfg.loss} loss, beta {dpo_cfg.beta}) against {config.init_from}, frozen as the reference'
               + (' (the base, adapters off)' if lora_cfg is not None else ''))
  writer.log(f'optimizer state: {_num_bytes(state.opt_state) / 1e6:.2f} MB for {trained:,} trained parameters')
  run = Run(config=config, workdir=workdir, writer=writer, mesh=mesh, rules=rules, data=data, model=model,
            checkpointer=checkpointer, lock=lock, meta=meta, train_batches=train_batches, train_step=train_step,
            eval_step=eval_step, references=references, frozen=frozen, merge=merge,
            tokens_per_step=config.batch_size * config.seq_len * (1 if dpo_cfg is None else 2),
            held_out_pairs=None if pairs is None else pairs['validation'], epoch_steps=per_epoch[0],
            model_flops=model_flops, peak_flops=peak)
  return run, state, start


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final validation metrics."""
  run, state, start = set_up(config, str(paths.path(workdir)))
  with run.lock:  # until the run's last file (results, samples) is written
    return _train_from(run, state, start)


def _train_from(run: Run, state, start: int) -> dict:
  """The training loop from step `start`, then the final figures and samples."""
  config = run.config
  writer, steps = run.writer, config.train.num_steps
  tokens_per_step = run.tokens_per_step
  results = {}
  step_metrics = StepMetrics(paths.path(run.workdir) / METRICS_FILE, start, config.train.on_nonfinite, writer.log)
  writer.start_history(start)
  validations = _restored_validations(run, start)
  end = start if validations.exhausted else steps  # a run that stopped early, run again, trains no further
  stopped_by = None
  clock = TrainingClock()
  first_step_seconds, train_seconds, timed_steps = 0.0, 0.0, 0  # in train steps alone, for the final summary
  # Leaving this block, by the end or by an error, waits for the save in flight to complete.
  with sharding.activation_rules(run.mesh, run.rules), StopSignals() as stop_signals, run.checkpointer:
    for step in range(start, end):
      batch = sharding.global_batch(next(run.train_batches), run.mesh)
      state, metrics = run.train_step(state, batch, run.frozen)
      done = step + 1
      step_metrics.add(done, metrics)
      clock.step()
      if step == start:
        jax.block_until_ready(state)
        first_step_seconds = clock.take()[1]
        writer.log(f'step {done}: compiled and ran the first step in {first_step_seconds:.1f}s')
      stopping = stop_signals.should_stop(done)
      log_now = clock.steps > 0 and (done % config.train.log_every == 0 or done == steps)
      validate_now = (done % config.train.eval_every == 0 or done == steps) and not stopping
      save_now = done % config.train.checkpoint_every == 0 or done == steps or stopping
      if log_now or validate_now or save_now:
        # Waits for the steps in flight, so that their time is counted as training, not as what
        # follows; in 'stop' mode this raises before a bad step is saved.
        step_metrics.pull()
      if log_now:
        interval_steps, elapsed = clock.take()
        train_seconds, timed_steps = train_seconds + elapsed, timed_steps + interval_steps
        _log_progress(run, done, step_metrics.take(), elapsed / interval_steps)
      if validate_now:
        with clock.paused():
          whole_split = done == steps and config.train.final_eval_whole_split
          results = _validate(run, state, done, whole_split)
          save_now = _track_validation(run, validations, state, done, results, whole_split) or save_now
      if save_now:
        with clock.paused():
          run.checkpointer.save(done, state, run.train_batches, {**run.meta, **validations.to_meta()})
      if stopping:
        stopped_by = stop_signals.received or 'a preemption notice'
        break
      if validations.exhausted:
        end = done
        break
  if stopped_by:
    writer.log(f'step {done}: stopped by {stopped_by}; saved a checkpoint at step {done}. '
               'Run the same command to resume.')
    writer.close()
    return {'step': done, 'stopped_by': stopped_by}
  end = max(start, end)
  if not results or (end < steps and config.train.final_eval_whole_split):
    # Resumed at the end (nothing trained, but the figures are still reported), or stopped early: the
    # figures of the whole split, as at a normal end.
    results = _validate(run, state, end, whole_split=config.train.final_eval_whole_split)
  if timed_steps:
    results['seconds_per_step'] = train_seconds / timed_steps  # after the first (compiling) one
    writer.log(f'trained {end - start} steps in {format_duration(first_step_seconds + train_seconds)}: '
               f'{format_duration(first_step_seconds)} for the first (compiling), then '
               f'{tokens_per_step / results["seconds_per_step"]:,.0f} tokens/s; validation and checkpoints '
               'not counted')
  results.update(step=end, train_seconds=first_step_seconds + train_seconds,
                 **_stopping_results(run, validations, stopped_early=end < steps, step=end))
  for name, shares in _token_shares(run).items():  # a mixture: beside each source's validation figures
    results['mixture'][name].update(shares)
  if jax.process_index() == 0:
    (paths.path(run.workdir) / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  _print_samples(run.model, run.model_params(state), run.data.tokenizer, config, writer)
  writer.close()
  return results


def _log_progress(run: Run, step: int, host_metrics: list[dict], step_seconds: float) -> None:
  tokens_per_sec = run.tokens_per_step / step_seconds
  mfu = model_flops_utilization(run.model_flops, tokens_per_sec, run.peak_flops, jax.device_count())
  loss = float(np.mean([m['loss'] for m in host_metrics]))
  last, steps = host_metrics[-1], run.config.train.num_steps
  epoch = {'train/epoch': _epochs(run, step)} if run.config.train.num_epochs else {}
  run.writer.log(f'step {step}/{steps} | loss {loss:.3f} | lr {last["learning_rate"]:.2e} | '
                 f'grad norm {last["grad_norm"]:.2f} | {tokens_per_sec:,.0f} tok/s | '
                 f'MFU {100 * mfu:.1f}% | ETA {format_duration(step_seconds * (steps - step))}'
                 + ''.join(f' | epoch {value:.3f}' for value in epoch.values()))
  run.writer.scalars(step, {'train/loss': loss, 'train/learning_rate': float(last['learning_rate']),
                            'train/grad_norm': float(last['grad_norm']),
                            'perf/tokens_per_sec': tokens_per_sec, 'perf/mfu': mfu, **epoch})
  if run.held_out_pairs is not None:  # DPO: the training pairs' figures, means over the steps since the last log
    figures = {name: float(np.mean([m[name] for m in host_metrics])) for name in preference.FIGURES}
    run.writer.log(f'step {step}: preference accuracy {figures["accuracy"]:.1%} | reward margin '
                   f'{figures["reward_margin"]:.3f} | KL estimate {figures["kl"]:.4f} (training pairs)')
    run.writer.scalars(step, {f'train/dpo_{name}': value for name, value in figures.items()})
  shares = _token_shares(run)
  if shares:
    run.writer.log(f'step {step}: {mixture.shares_line(shares)}')
    run.writer.scalars(step, {f'data/share_{name}': s['share'] for name, s in shares.items()})


def _token_shares(run: Run) -> dict:
  """A mixture's sources' shares of the tokens trained on so far; {} for one source."""
  batches = run.train_batches
  if not batches.source_names:
    return {}
  return mixture.token_shares(batches.source_tokens, run.data.weights, jax.process_count())


def _held_out(run: Run, params, whole_split: bool) -> dict:
  """The held-out figures of the run's objective: the language model's, or DPO's on the held-out pairs."""
  if run.held_out_pairs is not None:
    return preference.held_out_metrics(run.eval_step, params, run.held_out_pairs, run.config, run.mesh, whole_split)
  return held_out_metrics(run.eval_step, params, run.data, run.config, run.mesh, whole_split)


def _validate(run: Run, state, step: int, whole_split: bool) -> dict:
  params = run.model_params(state)
  results = _held_out(run, params, whole_split)
  if run.references:
    _log_generation_metrics(run.writer, step, run.model, params, run.data.tokenizer, run.references,
                            run.config.eval)
  if run.held_out_pairs is None:
    _log_validation(run.writer, step, results, whole_split, loss_scope(run.config.data))
  else:
    _log_validation(run.writer, step, results['chosen_responses'], whole_split,
                    'the chosen responses of held-out preference pairs')
    run.writer.log(f'step {step}: preference accuracy {results["accuracy"]:.1%} | reward margin '
                   f'{results["reward_margin"]:.3f} | DPO loss {results["loss"]:.4f} | KL estimate '
                   f'{results["kl"]:.4f} ({results["pairs"]:,} held-out pairs)')
    run.writer.scalars(step, {f'val/dpo_{name}': results[name] for name in ('loss',) + preference.FIGURES})
  if isinstance(run.data, mixture.PreparedMixture):  # each source's held-out figures beside the mixture's
    by_source = {name: held_out_metrics(run.eval_step, params, part, run.config, run.mesh, whole_split)
                 for name, part in run.data.parts.items()}
    run.writer.log(f'step {step}: validation loss by source: '
                   + ' | '.join(f'{name} {figures["loss"]:.3f}' for name, figures in by_source.items()))
    run.writer.scalars(step, {f'val/loss_{name}': figures['loss'] for name, figures in by_source.items()})
    results['mixture'] = {name: {'validation': figures} for name, figures in by_source.items()}
  return results


def _epochs(run: Run, step: int) -> float:
  return step / max(run.epoch_steps, 1e-9)


def _restored_validations(run: Run, start: int) -> stopping.Validations:
  """Early stopping's and keep_best's record as the checkpoint the run resumed from saved it."""
  validations = stopping.Validations.from_meta(run.checkpointer.read_meta(start) if start else None,
                                               run.config.train.early_stopping_patience)
  if run.config.train.keep_best:
    run.checkpointer.keep_also(validations.best_step)
  if validations.exhausted:
    run.writer.log(f'step {start}: this run stopped early ({validations.since_best} validations without a lower '
                   'loss): nothing more to train. Raise train.early_stopping_patience to go on.')
  return validations


def _track_validation(run: Run, validations: stopping.Validations, state, step: int, results: dict,
                      whole_split: bool) -> bool:
  """Adds a validation to early stopping's and keep_best's record; True when its step must be saved (a new best
  that keep_best keeps, or the step the run stops at)."""
  train_cfg = run.config.train
  if not (train_cfg.keep_best or train_cfg.early_stopping_patience):
    return False
  # The other validations read a sample of the held-out split: the whole split is another measure.
  loss = results['loss'] if not whole_split else _held_out(run, run.model_params(state), False)['loss']
  best = validations.add(step, loss)
  if best and train_cfg.keep_best:
    run.checkpointer.keep_also(step)
  if validations.exhausted:
    run.writer.log(f'step {step}: early stopping: the validation loss has not gone below {validations.best_loss:.4f} '
                   f'(step {validations.best_step}) in {validations.since_best} validations '
                   f'(train.early_stopping_patience={validations.patience}); saved a checkpoint at step {step}.')
  return (best and train_cfg.keep_best) or validations.exhausted


def _stopping_results(run: Run, validations: stopping.Validations, stopped_early: bool, step: int) -> dict:
  """What results.json says of epochs, the best validation and early stopping, for the settings that ask."""
  train_cfg, results = run.config.train, {}
  if train_cfg.num_epochs:
    results['epochs'] = _epochs(run, step)
  if train_cfg.keep_best or train_cfg.early_stopping_patience:
    results['best'] = {'step': validations.best_step, 'loss': validations.best_loss,
                       'checkpoint_kept': train_cfg.keep_best}
    run.writer.log(f'best validation: loss {validations.best_loss:.4f} at step {validations.best_step} (on the '
                   'validation sample)' + (f'; its checkpoint is kept: evaluate it with --step {validations.best_step}'
                               if train_cfg.keep_best else ''))
  if train_cfg.early_stopping_patience:
    results['stopped_early'] = stopped_early
  return results


def _log_generation_metrics(writer, step, model, params, tokenizer, references, eval_cfg) -> None:
  metrics, _ = generation_metrics(model, params, tokenizer, references,
                                  Sampling(max_new_tokens=eval_cfg.max_new_tokens))
  writer.log(f'step {step}: BLEU {metrics["bleu"]:.2f} | ROUGE-1 {metrics["rouge1"]:.4f} | '
             f'ROUGE-L {metrics["rougeL"]:.4f} on {len(references)} references')
  writer.scalars(step, {f'val/{name}': value for name, value in metrics.items()})


def _print_samples(model, params, tokenizer, config, writer) -> None:
  prompts = list(config.sample.prompts)
  if not prompts:
    return
  sampling = Sampling(max_new_tokens=config.sample.max_new_tokens, temperature=config.sample.temperature,
                      top_k=config.sample.top_k, seed=config.seed)
  for prompt, continuation in zip(prompts, complete(model, params, tokenizer, prompts, sampling)):
    writer.log(f'--- sample, prompt {prompt!r}\n{prompt}{continuation.text}')


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise JaxgptError('--workdir is required: the directory for checkpoints, logs and samples.')
  train(require_config(flags.FLAGS.config), flags.FLAGS.workdir)


def cli():
  define_config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples; reused to resume.')
  run_cli(main)


if __name__ == '__main__':
  cli()
