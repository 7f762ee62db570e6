"""Data throughput: cleaning (docs/s, MB/s) and the Grain pipeline's tokens/s vs what training needs.

  python tools/bench_data.py [--docs 600] [--workers 0] [--batches 200] [--train_tokens_per_s 3900]

Cleaning is measured on the standard library's source with the quickstart's
cleaning settings, in this process and with the worker pool. The pipeline is
measured on the quickstart's prepared dataset (built on first use, cached) with
the quickstart's batch shape, and compared with the ~9,200 tokens/s that the
quickstart's training step consumes on a 2-core CPU (README): the goal is 10x.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from jaxgpt.data import builder, corpus, pipeline, sources  # noqa: E402
from jaxgpt.data.clean import Cleaner  # noqa: E402
from jaxgpt.data.report import Report  # noqa: E402


def bench_cleaning(data_cfg, workers: int) -> tuple[float, float]:
  """(docs/s, MB/s) of the whole cleaning stage (clean, dedup, split, write) with `workers` processes."""
  data_cfg.num_workers = workers
  report = Report()
  with tempfile.TemporaryDirectory() as out:
    corpus.clean_corpus(sources.open_source(data_cfg), data_cfg, out, report)
  return report.speed['docs_per_s'], report.speed['mb_per_s']


def bench_cleaner_alone(data_cfg) -> tuple[float, float]:
  """(docs/s, MB/s) of the per-document steps in this process: the cost one core pays."""
  records = list(sources.open_source(data_cfg).records())
  cleaner = Cleaner(data_cfg)
  start = time.perf_counter()
  for record in records:
    cleaner(record)
  seconds = time.perf_counter() - start
  return len(records) / seconds, sum(r.size for r in records) / 1e6 / seconds


def bench_pipeline(config, batches: int) -> float:
  """Tokens/s of packed, shuffled training batches from the Grain pipeline."""
  data = builder.prepare(config.data, log=lambda m: None)
  it = pipeline.make_iterator(data.chunks('train', config.seq_len + 1), seq_len=config.seq_len,
                              local_batch_size=config.batch_size, seed=0, shuffle=True)
  next(it)  # the first batch builds the index; training pays it once too
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.batch_size * config.seq_len / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--docs', type=int, default=600, help='standard-library files to clean')
  parser.add_argument('--workers', type=int, default=0, help='cleaning processes; 0 = one per core')
  parser.add_argument('--batches', type=int, default=200, help='pipeline batches to time')
  parser.add_argument('--train_tokens_per_s', type=float, default=9200.0,
                      help="what the quickstart's training step consumes (README, 2-core CPU)")
  args = parser.parse_args()

  config = quickstart.get_config()
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.max_docs = args.docs
  docs_s, mb_s = bench_cleaner_alone(data_cfg)
  print(f'cleaning, one process, per-document steps: {docs_s:,.0f} docs/s, {mb_s:.2f} MB/s')
  workers = args.workers or os.cpu_count()
  docs_s, mb_s = bench_cleaning(data_cfg, workers)
  print(f'cleaning stage, {workers} worker(s), incl. start-up, dedup and writing: {docs_s:,.0f} docs/s, {mb_s:.2f} MB/s')

  tokens_s = bench_pipeline(config, args.batches)
  ratio = tokens_s / args.train_tokens_per_s
  print(f'Grain pipeline: {tokens_s:,.0f} tokens/s = {ratio:.0f}x the {args.train_tokens_per_s:,.0f} tokens/s '
        f"training consumes ({'meets' if ratio >= 10 else 'misses'} the 10x goal)")


if __name__ == '__main__':
  main()
