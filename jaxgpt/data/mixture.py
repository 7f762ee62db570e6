"""Weighted mixtures of several sources (data.mixture): one shared tokenizer, one cache per source.

Each source is cleaned, deduplicated and tokenized on its own by
builder.prepare, into its own cache directory, with its own report. The
tokenizer is one for all: a given one (a base model's, or data.tokenizer.kind
= 'byte_bpe'), or a SentencePiece model trained on a weighted sample of every
source's cleaned train split, in the proportions of the weights, and cached
next to the sources' caches under a fingerprint of all their settings. Each
source's own cache fingerprint includes that tokenizer's.

Training mixes the sources' packed rows by weight (pipeline.Mixture), so the
weights are the shares of the tokens trained on; the pipeline counts the
tokens each source gave and training logs the realized shares.
"""

import collections
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator

from jaxgpt import paths
from jaxgpt.config import JaxgptError, mixture_parts
from jaxgpt.data import builder, corpus, instructions, pipeline, sources
from jaxgpt.data.report import SPLITS, Report
from jaxgpt.data.tokenizer import Tokenizer, train_tokenizer


@dataclasses.dataclass
class PreparedMixture:
  """What builder.PreparedData offers training and evaluation, for several sources."""
  parts: dict  # name -> builder.PreparedData
  weights: dict  # name -> weight, normalised to sum to 1
  tokenizer: Tokenizer
  reused: bool

  @property
  def directory(self) -> str:
    return ', '.join(f'{name}={part.directory}' for name, part in self.parts.items())

  @property
  def report(self) -> dict:
    return combined_report({name: part.report for name, part in self.parts.items()}, self.weights)

  def chunks(self, split: str, chunk_len: int) -> pipeline.Mixture:
    """The sources' splits as chunks, mixed by weight when read."""
    return pipeline.Mixture({name: part.chunks(split, chunk_len) for name, part in self.parts.items()},
                            self.weights)


def weights(data_cfg) -> dict[str, float]:
  """Each source's weight, normalised to sum to 1."""
  parts = mixture_parts(data_cfg)
  total = sum(weight for weight, _ in parts.values())
  return {name: weight / total for name, (weight, _) in parts.items()}


def prepare(data_cfg, log=print, tokenizer: Tokenizer | None = None, pipeline_args=()) -> PreparedMixture:
  """Every source's cache (built where missing), all tokenized by one tokenizer."""
  configs = {name: part for name, (_, part) in mixture_parts(data_cfg).items()}
  for name, part in configs.items():  # every source checked before any is built
    try:
      builder.check_settings(part)
    except JaxgptError as e:
      raise JaxgptError(f'data.mixture.{name}: {e}') from None
  reused = True
  if tokenizer is None and data_cfg.tokenizer.kind == 'sentencepiece' and not data_cfg.tokenizer.path:
    tokenizer, reused = _shared_tokenizer(data_cfg, configs, log)
  parts = {}
  for name, part in configs.items():
    log(f'data: mixture source {name!r}')
    parts[name] = builder.prepare(part, log, tokenizer, pipeline_args)
  fingerprints = {part.tokenizer.fingerprint for part in parts.values()}
  assert len(fingerprints) == 1, f'the sources were tokenized differently: {fingerprints}'
  first = next(iter(parts.values()))
  return PreparedMixture(parts, weights(data_cfg), first.tokenizer,
                         reused and all(part.reused for part in parts.values()))


def _shared_tokenizer(data_cfg, configs: dict, log) -> tuple[Tokenizer, bool]:
  """The SentencePiece model for the whole mixture, from the cache or trained now; (tokenizer, reused)."""
  key = json.dumps([weights(data_cfg), {name: builder.fingerprint(part) for name, part in configs.items()}],
                   sort_keys=True)
  file = paths.path(data_cfg.cache_dir) / f'mixture-tokenizer-{hashlib.sha256(key.encode()).hexdigest()[:12]}.model'
  if file.exists():
    log(f'data: reusing the mixture tokenizer {file}')
    return Tokenizer.load(file), True
  paths.check_writable(paths.path(data_cfg.cache_dir), 'data.cache_dir')
  start = time.time()
  tok_cfg = data_cfg.tokenizer
  with tempfile.TemporaryDirectory(prefix='jaxgpt-mixture-') as building:
    directories = {}
    for name, part in configs.items():
      log(f'data: cleaning {name!r} for the shared tokenizer')
      directories[name] = os.path.join(building, name)
      os.makedirs(directories[name])
      corpus.clean_corpus(sources.open_source(part), part, directories[name], Report())
    texts = map(instructions.without_markers, weighted_sample(directories, weights(data_cfg)))
    tokenizer = train_tokenizer(texts, data_cfg.vocab_size, tok_cfg.model_type, tok_cfg.special_tokens)
  if paths.is_remote(file):
    tokenizer.save(file)  # a bucket object appears whole or not at all
  else:
    partial = f'{file}.building-{os.getpid()}'
    tokenizer.save(partial)
    os.replace(partial, file)
  log(f'data: trained a {tokenizer.vocab_size}-piece {tok_cfg.model_type.upper()} tokenizer on a weighted sample '
      f'of the {len(configs)} sources in {time.time() - start:.1f}s')
  return tokenizer, False


def weighted_sample(directories: dict[str, str], source_weights: dict[str, float]) -> Iterator[str]:
  """Cleaned train texts from each source's directory, interleaved so that every prefix holds about the
  weights' shares of their UTF-8 bytes: as much of each as the scarcest source (for its weight) allows."""
  sizes = {name: sum(len(text.encode()) for text in corpus.read_clean(d, 'train')) for name, d in directories.items()}
  scale = min(sizes[name] / source_weights[name] for name in directories)  # the most the scarcest allows
  budgets = {name: max(1.0, source_weights[name] * scale) for name in directories}
  streams = {name: corpus.read_clean(d, 'train') for name, d in directories.items()}
  taken = dict.fromkeys(directories, 0)
  while streams:
    name = min(streams, key=lambda n: taken[n] / budgets[n])
    text = next(streams[name], None)
    if text is None or taken[name] >= budgets[name]:
      del streams[name]
      continue
    taken[name] += len(text.encode())
    yield text


def combined_report(reports: dict[str, dict], source_weights: dict[str, float]) -> dict:
  """The sources' reports as one (builder's layout, for report.table): counts added up, reasons and
  examples named by source; `mixture` keeps each source's weight and split sizes."""
  first = next(iter(reports.values()))
  combined = {'read': collections.Counter(), 'kept': collections.Counter(),
              **{section: {} for section in ('dropped', 'changed', 'flagged')},
              **{split: collections.Counter() for split in SPLITS}}
  for name, report in reports.items():
    for section in ('read', 'kept', *SPLITS):
      combined[section].update(report[section])
    for section in ('dropped', 'changed', 'flagged'):
      combined[section].update({f'{name}: {reason}': entry for reason, entry in report[section].items()})
  train_tokens = {name: report['train']['tokens'] for name, report in reports.items()}
  combined['tokenizer'] = {
      **first['tokenizer'],
      'tokens_per_byte': combined['train']['tokens'] / max(1, combined['train']['bytes']),
      'unknown_rate': sum(r['tokenizer']['unknown_rate'] * train_tokens[n] for n, r in reports.items())
                      / max(1, combined['train']['tokens'])}
  tokens = {name: sum(report[split]['tokens'] for split in SPLITS) for name, report in reports.items()}
  clean_seconds = max(1e-9, sum(r['speed']['clean_seconds'] for r in reports.values()))
  tokenize_seconds = max(1e-9, sum(tokens[n] / r['speed']['tokens_per_s'] for n, r in reports.items()))
  combined['speed'] = {'workers': first['speed']['workers'], 'clean_seconds': clean_seconds,
                       'docs_per_s': combined['read']['documents'] / clean_seconds,
                       'mb_per_s': combined['read']['bytes'] / 1e6 / clean_seconds,
                       'tokens_per_s': sum(tokens.values()) / tokenize_seconds}
  combined['mixture'] = {name: {'weight': source_weights[name], **{split: r[split] for split in SPLITS}}
                         for name, r in reports.items()}
  return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in combined.items()}


def token_shares(source_tokens: dict[str, int], source_weights: dict[str, float], process_count: int) -> dict:
  """{name: {'weight', 'tokens', 'share'}}: each source's tokens trained on so far, and its share of them.

  `source_tokens` are one process's counts (pipeline.BatchIterator): every
  process draws its rows from the sources in the same fixed interleaving, so
  its shares are the run's, and the run's tokens are its own times the
  process count.
  """
  total = max(1, sum(source_tokens.values()))
  return {name: {'weight': source_weights[name], 'tokens': tokens * process_count, 'share': tokens / total}
          for name, tokens in source_tokens.items()}


def shares_line(shares: dict) -> str:
  """`token_shares` for the log."""
  parts = [f'{name} {100 * s["share"]:.1f}% (weight {100 * s["weight"]:.1f}%)' for name, s in shares.items()]
  return f'tokens trained on by source: {" | ".join(parts)} of {sum(s["tokens"] for s in shares.values()):,}'
