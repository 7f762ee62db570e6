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

from jaxgpt import hf, inference, lora, paths, run_dir, run_lock, sharding, state as state_lib
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import JaxgptError, define_config_flag, require_config, run_cli, validate
from jaxgpt.data import builder, mixture, pipeline
from jaxgpt.evaluation import eval_sums, generation_metrics, held_out_metrics, loss_scope, read_references
from jaxgpt.metrics import (MetricWriter, StepMetrics, TrainingClock, format_duration, model_flops_utilization,
                            peak_flops_per_device)
from jaxgpt.model import GPT, build_model, flops_per_token, loss_sums, num_params
from jaxgpt.optim import learning_rate_schedule, make_optimizer
from jaxgpt.preemption import StopSignals
from jaxgpt.sample import Sampling, complete

RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'  # every step's loss, grad norm and learning rate


def make_train_step(model, tx, schedule, accum_steps: int, seed: int = 0, lora_cfg=None):
  """The step; with LoRA settings, state.params are the adapters and `base` the frozen params they adapt."""
  def train_step(state, batch, base=None):
    # The step's dropout key derives from the seed and the step alone: no RNG state to
    # checkpoint, and a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_of(trainable, microbatch, micro_rng):
      if lora_cfg is None:
        return loss_sums(model, trainable, microbatch, micro_rng)
      model_rng, adapter_rng = jax.random.split(micro_rng)
      return loss_sums(model, lora.merge(base, trainable, lora_cfg, adapter_rng), microbatch, model_rng)

    def grads_of(microbatch, micro_rng):
      (loss_sum, count), grads = jax.value_and_grad(
          lambda p: loss_of(p, microbatch, micro_rng), has_aux=True)(state.params)
      return loss_sum, count, grads

    if accum_steps == 1:
      loss_sum, count, grad_sum = grads_of(batch, rng)
    else:
      # Row i of microbatch j is row i * accum + j of the batch: each device keeps its own rows.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, xs):
        microbatch, j = xs
        loss_sum, count, grads = grads_of(microbatch, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss_sum, count, grad_sum), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))

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
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step), 'finite': finite}
    return new_state, metrics

  return train_step


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
  eval_step: Callable  # (params, batch) -> evaluation.eval_sums
  references: list  # eval.references examples for BLEU/ROUGE at each validation
  frozen: Any = None  # LoRA: the frozen base params, an argument of every step
  merge: Callable | None = None  # LoRA: (frozen, adapters) -> params
  model_flops: float = 0.0  # per token
  peak_flops: float = 0.0  # per device

  def model_params(self, state):
    """The params the model runs with: for LoRA, the base with the adapters merged in."""
    return state.params if self.frozen is None else self.merge(self.frozen, state.params)


def set_up(config, workdir: str):
  """Checks the config and workdir, prepares the data, and builds (or restores) the state.

  Returns (run, state, first step). Every check that can fail runs before the
  first training step, so mistakes surface in seconds, not at the first save.
  """
  validate(config)
  lora.check_config(config)
  lora_cfg = lora.settings(config)
  sharding.initialize_distributed(config.distributed)
  if config.train.compilation_cache_dir:
    _use_compilation_cache(paths.expand(config.train.compilation_cache_dir))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_divisibility(config, mesh.shape)
  paths.check_writable(workdir, '--workdir')  # every process: a bucket or credentials missing on any host fail here
  lock = run_lock.acquire(workdir)  # before anything writes to the workdir
  writer = MetricWriter(workdir)
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
  steps = config.train.num_steps
  tx = make_optimizer(config.optim, steps)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, keep_every=config.train.keep_every)
  meta = state_lib.checkpoint_meta(config, tokenizer)
  # Read now, so that a bad references file fails before training rather than at the first validation.
  references = read_references(config.eval.references)[:config.eval.max_examples] if config.eval.references else []
  make_train_batches = lambda seed: pipeline.make_iterator(
      data.chunks('train', config.seq_len + 1), seq_len=config.seq_len, seed=seed,
      shuffle=config.data.shuffle, local_batch_size=config.batch_size // jax.process_count())
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
  if lora_cfg is not None:
    frozen = jax.device_put(hf.params_in_layout(base.params, config.model.scan_layers), param_shardings)
    merge = jax.jit(lambda base_params, adapters: lora.merge(base_params, adapters, lora_cfg),
                    out_shardings=param_shardings)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(
      make_train_step(model, tx, learning_rate_schedule(config.optim, steps), config.optim.grad_accum_steps,
                      config.seed + 1, lora_cfg),
      in_shardings=(state_shardings, batch_sharding, None if frozen is None else param_shardings),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  token_bytes = tokenizer.token_bytes()
  eval_step = jax.jit(lambda params, batch: eval_sums(model, params, batch, token_bytes),
                      in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

  model_flops = flops_per_token(model.cfg, config.seq_len)
  peak, peak_source = peak_flops_per_device(config.train.peak_flops_per_device)
  trained = num_params(state.params)
  total = trained if frozen is None else num_params(frozen)
  writer.log(f'model: {total / 1e6:.2f}M parameters, {model_flops / 1e6:.1f} MFLOPs/token; '
             f'mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s per device ({peak_source})')
  if frozen is not None:
    writer.log(f'LoRA rank {lora_cfg.rank} on {", ".join(lora_cfg.targets)}: {trained:,} trained parameters '
               f'({100 * trained / total:.2f}%); the base at {config.init_from} stays frozen')
  writer.log(f'optimizer state: {_num_bytes(state.opt_state) / 1e6:.2f} MB for {trained:,} trained parameters')
  run = Run(config=config, workdir=workdir, writer=writer, mesh=mesh, rules=rules, data=data, model=model,
            checkpointer=checkpointer, lock=lock, meta=meta, train_batches=train_batches, train_step=train_step,
            eval_step=eval_step, references=references, frozen=frozen, merge=merge,
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
  tokens_per_step = config.batch_size * config.seq_len
  results = {}
  step_metrics = StepMetrics(paths.path(run.workdir) / METRICS_FILE, start, config.train.on_nonfinite, writer.log)
  stopped_by = None
  clock = TrainingClock()
  first_step_seconds, train_seconds, timed_steps = 0.0, 0.0, 0  # in train steps alone, for the final summary
  # Leaving this block, by the end or by an error, waits for the save in flight to complete.
  with sharding.activation_rules(run.mesh, run.rules), StopSignals() as stop_signals, run.checkpointer:
    for step in range(start, steps):
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
          results = _validate(run, state, done, whole_split=done == steps and config.train.final_eval_whole_split)
      if save_now:
        with clock.paused():
          run.checkpointer.save(done, state, run.train_batches, run.meta)
      if stopping:
        stopped_by = stop_signals.received or 'a preemption notice'
        break
  if stopped_by:
    writer.log(f'step {done}: stopped by {stopped_by}; saved a checkpoint at step {done}. '
               'Run the same command to resume.')
    writer.close()
    return {'step': done, 'stopped_by': stopped_by}
  if not results:  # resumed at the end: nothing trained, but the figures are still reported
    results = _validate(run, state, start, whole_split=config.train.final_eval_whole_split)
  if timed_steps:
    results['seconds_per_step'] = train_seconds / timed_steps  # after the first (compiling) one
    writer.log(f'trained {steps - start} steps in {format_duration(first_step_seconds + train_seconds)}: '
               f'{format_duration(first_step_seconds)} for the first (compiling), then '
               f'{tokens_per_step / results["seconds_per_step"]:,.0f} tokens/s; validation and checkpoints '
               'not counted')
  results.update(step=max(start, steps), train_seconds=first_step_seconds + train_seconds)
  for name, shares in _token_shares(run).items():  # a mixture: beside each source's validation figures
    results['mixture'][name].update(shares)
  if jax.process_index() == 0:
    (paths.path(run.workdir) / RESULTS_FILE).write_text(json.dumps(results, indent=2))
  _print_samples(run.model, run.model_params(state), run.data.tokenizer, config, writer)
  writer.close()
  return results


def _log_progress(run: Run, step: int, host_metrics: list[dict], step_seconds: float) -> None:
  tokens_per_sec = run.config.batch_size * run.config.seq_len / step_seconds
  mfu = model_flops_utilization(run.model_flops, tokens_per_sec, run.peak_flops, jax.device_count())
  loss = float(np.mean([m['loss'] for m in host_metrics]))
  last, steps = host_metrics[-1], run.config.train.num_steps
  run.writer.log(f'step {step}/{steps} | loss {loss:.3f} | lr {last["learning_rate"]:.2e} | '
                 f'grad norm {last["grad_norm"]:.2f} | {tokens_per_sec:,.0f} tok/s | '
                 f'MFU {100 * mfu:.1f}% | ETA {format_duration(step_seconds * (steps - step))}')
  run.writer.scalars(step, {'train/loss': loss, 'train/learning_rate': float(last['learning_rate']),
                            'train/grad_norm': float(last['grad_norm']),
                            'perf/tokens_per_sec': tokens_per_sec, 'perf/mfu': mfu})
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


def _validate(run: Run, state, step: int, whole_split: bool) -> dict:
  params = run.model_params(state)
  results = held_out_metrics(run.eval_step, params, run.data, run.config, run.mesh, whole_split)
  if run.references:
    _log_generation_metrics(run.writer, step, run.model, params, run.data.tokenizer, run.references,
                            run.config.eval)
  _log_validation(run.writer, step, results, whole_split, loss_scope(run.config.data))
  if isinstance(run.data, mixture.PreparedMixture):  # each source's held-out figures beside the mixture's
    by_source = {name: held_out_metrics(run.eval_step, params, part, run.config, run.mesh, whole_split)
                 for name, part in run.data.parts.items()}
    run.writer.log(f'step {step}: validation loss by source: '
                   + ' | '.join(f'{name} {figures["loss"]:.3f}' for name, figures in by_source.items()))
    run.writer.scalars(step, {f'val/loss_{name}': figures['loss'] for name, figures in by_source.items()})
    results['mixture'] = {name: {'validation': figures} for name, figures in by_source.items()}
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
