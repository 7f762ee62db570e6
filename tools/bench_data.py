"""Data preparation throughput, stage by stage, on a corpus of 200+ MB built from this machine's own files.

  python tools/bench_data.py [--mb 0] [--workers 2] [--beam] [--corpus_dir ~/.cache/jaxgpt/bench_corpus]

The corpus is built on first use and cached as two JSONL files: code (the .py files of the
standard library and of the installed packages) and prose (every man page under /usr/share/man as
plain text, the text files of /usr/share/doc, the installed packages' .rst/.md/.txt files);
`manifest.json` beside them lists its composition. The code is cleaned with the quickstart's
settings (configs/quickstart.py), the prose with configs/web_text.py's (NFKC, Gopher filters,
profanity classifier, PII scrubbing); --mb takes the first MB of each part.

Every figure is MB of raw corpus per second per core, so the slowest stage is the one with the
smallest figure: each per-document step in this process (`Cleaner.stage_seconds`), the profanity
classifier before (alt-profanity-check's `predict_prob`, per document) and now (side by side, on
the same lines, scores checked identical), dedup, and the whole of `builder.prepare` with
--workers processes (cleaning with dedup, split and write; tokenizer training; tokenizing into
TFDS array_record); with --beam, the whole of it again with data.executor='beam' on Apache Beam's
DirectRunner with --workers processes. A stage on several processes (or SentencePiece's threads)
is divided by the cores it keeps busy. Last, the Grain pipeline's tokens/s on the quickstart's
prepared dataset against what its training step consumes. --small runs all of it on about 2 MB in
seconds.
"""

import argparse
import gzip
import importlib.util
import json
import os
import re
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import quickstart, web_text  # noqa: E402
from jaxgpt.data import builder, pipeline, sources  # noqa: E402
from jaxgpt.data.clean import Cleaner, normalize, quality_problem  # noqa: E402
from jaxgpt.data.dedup import Deduplicator  # noqa: E402
from jaxgpt.safety import ProfanityClassifier  # noqa: E402

PARTS = {'code': quickstart, 'prose': web_text}
_FULL_MB = {'code': 120, 'prose': 150}  # about all the prose a Debian image with Python packages has
_SMALL_MB = {'code': 1, 'prose': 1}
_STEPS = ('read and extract', 'normalize', 'quality filters', 'safety: word lists', 'safety: classifier', 'safety: PII',
          'exact hash', 'MinHash')  # Cleaner's, in its order
_MAX_FILE_BYTES = 2_000_000  # larger .txt files in packages are data tables, not text

# --- the corpus ---------------------------------------------------------------------------------

# roff, the man pages' markup: request lines ('.SH NAME') and escapes ('\fB', '\(em', '\*(lq').
_REQUEST = re.compile(r"^[.'][ \t]*(\S*)[ \t]*(.*)$")
_ESCAPE = re.compile(r'\\f(?:\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[*n](?:\(..|\[[^\]]*\]|.)|\\s[+-]?\d+|\\[&|^%:]')
_PARAGRAPH_BREAKS = {'SH', 'SS', 'PP', 'P', 'LP', 'TP', 'IP', 'HP', 'sp', 'br', 'TH', 'RS', 'RE', 'nf', 'fi', 'EX', 'EE'}
_HEADINGS = {'SH', 'SS', 'TP', 'IP', 'TH'}
_FONT_REQUESTS = {'B', 'I', 'BR', 'IR', 'RB', 'BI', 'IB', 'RI', 'SM', 'SB'}


def roff_text(source: str) -> str:
  """A man page as plain text, one paragraph per line, as prose appears in web text."""
  paragraphs, current = [], []

  def end_paragraph():
    if current:
      paragraphs.append(' '.join(current))
      current.clear()

  for line in source.splitlines():
    request = _REQUEST.match(line)
    if request:
      name, argument = request.groups()
      argument = _ESCAPE.sub('', argument.replace('"', ''))
      if name in _PARAGRAPH_BREAKS:
        end_paragraph()
        if name in _HEADINGS and argument:
          paragraphs.append(argument)
      elif name in _FONT_REQUESTS and argument:
        current.append(argument)
      continue  # other requests (registers, conditionals, macros) hold no text
    line = _ESCAPE.sub('', line).replace('\\-', '-').replace('\\e', '\\').replace('\\ ', ' ').strip()
    if line:
      current.append(line)
    else:
      end_paragraph()
  end_paragraph()
  return '\n'.join(p.strip() for p in paragraphs if p.strip()) + '\n'


def _package_dirs() -> list[str]:
  return sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})


def _code_files():
  stdlib = sysconfig.get_paths()['stdlib']
  for root in [stdlib] + _package_dirs():
    yield from _files(root, lambda name: name.endswith('.py'))


def _prose_files():
  for root in ('/usr/share/man', '/usr/share/doc'):
    yield from _files(root, lambda name: not re.search(r'\.(html?|png|gif|jpe?g|svg|css|js|pdf|xz|bz2|zip|deb)(\.gz)?$',
                                                        name))
  for root in _package_dirs():
    yield from _files(root, lambda name: name.endswith(('.rst', '.md', '.txt')))


def _files(root: str, wanted):
  """The wanted files under `root` in sorted order, leaving out site-packages (the stdlib's) and caches."""
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ('site-packages', '__pycache__'))
    yield from (os.path.join(directory, name) for name in sorted(files) if wanted(name))


def _read_text(path: str, part: str) -> str | None:
  try:
    if os.path.islink(path) or os.path.getsize(path) > _MAX_FILE_BYTES:
      return None
    raw = gzip.open(path).read() if path.endswith('.gz') else open(path, 'rb').read()
    text = raw.decode('utf-8')
  except (OSError, UnicodeDecodeError, EOFError):
    return None
  if part == 'prose' and path.startswith('/usr/share/man/'):
    text = roff_text(text)
  return text if text.strip() and '\x00' not in text else None


def build_corpus(directory: str, megabytes: dict[str, int]) -> dict:
  """Writes {part}.jsonl (records {"id": path, "text": ...}) and manifest.json under `directory`, once."""
  manifest_file = os.path.join(directory, 'manifest.json')
  if os.path.exists(manifest_file):
    return json.load(open(manifest_file))
  os.makedirs(directory, exist_ok=True)
  manifest = {}
  for part, files in (('code', _code_files()), ('prose', _prose_files())):
    limit, written, origins = megabytes[part] * 1e6, 0, {}
    with open(os.path.join(directory, f'{part}.jsonl.tmp'), 'w', encoding='utf-8') as out:
      for path in files:
        if written >= limit:
          break
        text = _read_text(path, part)
        if text is None:
          continue
        line = json.dumps({'id': path, 'text': text}, ensure_ascii=False) + '\n'
        out.write(line)
        size = len(line.encode('utf-8'))
        written += size
        origin = next((o for o in ('/usr/share/man', '/usr/share/doc', 'site-packages', 'dist-packages')
                       if o in path), 'stdlib')
        count, total = origins.get(origin, (0, 0))
        origins[origin] = (count + 1, total + size)
    os.replace(out.name, os.path.join(directory, f'{part}.jsonl'))
    manifest[part] = {'documents': sum(c for c, _ in origins.values()), 'mb': round(written / 1e6, 1),
                      'origins': {o: {'documents': c, 'mb': round(s / 1e6, 1)} for o, (c, s) in origins.items()}}
  with open(manifest_file, 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest


# --- the measurements ---------------------------------------------------------------------------


def data_config(part: str, corpus_dir: str, mb: float):
  """The part's settings, reading the first `mb` MB of its JSONL file (0: all of it)."""
  data_cfg = PARTS[part].get_config().data
  data_cfg.update(source='jsonl', path=os.path.join(corpus_dir, f'{part}.jsonl'), text_field='text', id_field='id')
  if mb:
    with open(data_cfg.path, 'rb') as f:
      size = 0
      for count, line in enumerate(f, start=1):
        size += len(line)
        if size >= mb * 1e6:
          break
    data_cfg.max_docs = count
  return data_cfg


def per_document_steps(data_cfg, records) -> tuple[dict, list]:
  """Seconds per step of `Cleaner` in this process, and the outcomes."""
  cleaner = Cleaner(data_cfg)
  outcomes = [cleaner(r) for r in records]
  return cleaner.stage_seconds(), outcomes


def classifier_before_and_after(data_cfg, records) -> tuple[float, float]:
  """Seconds of the classifier before (predict_prob) and now on the same lines: the lines of each document
  that reaches the classifier, as `SafetyChecker.check` gives them. Raises if any score differs."""
  from profanity_check import predict_prob
  documents = []
  for record in records:
    extracted = sources.extract_text(record, data_cfg)
    if extracted.text is not None:
      text, _ = normalize(extracted.text, data_cfg.clean)
      if not quality_problem(text, data_cfg.clean):
        documents.append(list(dict.fromkeys(l.strip() for l in text.splitlines() if l.strip())))
  documents = [lines for lines in documents if lines]
  classifier = ProfanityClassifier()
  start = time.perf_counter()
  before = [predict_prob(lines) for lines in documents]
  middle = time.perf_counter()
  after = [classifier.scores(lines) for lines in documents]
  end = time.perf_counter()
  if not all(np.array_equal(b, a) for b, a in zip(before, after)):
    raise SystemExit('the classifier scores differ from predict_prob: the fast path is wrong')
  return middle - start, end - middle


def dedup_seconds(data_cfg, outcomes) -> float:
  dedup = Deduplicator(data_cfg.clean)
  start = time.perf_counter()
  for order, outcome in enumerate(outcomes):
    if not outcome.dropped:
      dedup.exact_original(order, outcome)
  dedup.near_originals()
  return time.perf_counter() - start


def prepare_stages(data_cfg, workers: int, beam: bool) -> dict:
  """Seconds of builder.prepare's stages with `workers` cleaning processes, or on Beam's DirectRunner with `workers`
  worker processes, from its report."""
  data_cfg.num_workers = workers
  if beam:
    data_cfg.executor = 'beam'
    data_cfg.beam_args = f'--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers={workers}'
  with tempfile.TemporaryDirectory() as cache:
    data_cfg.cache_dir = cache
    start = time.perf_counter()
    report = builder.prepare(data_cfg, log=lambda message: None).report
    total = time.perf_counter() - start
  speed = report['speed']
  tokens = sum(report[split]['tokens'] for split in ('train', 'validation'))
  clean, tokenize = speed['clean_seconds'], tokens / speed['tokens_per_s']
  # What prepare does besides: mostly training the tokenizer, and reading the lengths back.
  return {'clean': clean, 'tokenizer training': total - clean - tokenize, 'tokenize + TFDS': tokenize}


def bench_part(part: str, corpus_dir: str, args) -> dict:
  """Rows of (stage, MB/s per core, note) for one part of the corpus."""
  data_cfg = data_config(part, corpus_dir, args.mb)
  records = list(sources.open_source(data_cfg).records())
  mb = sum(r.size for r in records) / 1e6
  rate = lambda seconds, cores=1: mb / max(seconds, 1e-9) / cores
  rows = {}
  steps, outcomes = per_document_steps(data_cfg, records)
  assert set(steps) <= set(_STEPS), f'steps missing from _STEPS: {set(steps) - set(_STEPS)}'
  for step in filter(steps.__contains__, _STEPS):
    rows[f'1 process: {step}'] = rate(steps[step])
  if 'safety: classifier' in steps:
    before, after = classifier_before_and_after(data_cfg, records)
    rows['1 process: safety: classifier, before (predict_prob), same lines'] = rate(before)
    rows['1 process: safety: classifier, now, same lines'] = rate(after)
    rows['1 process: per-document steps, before'] = rate(sum(steps.values()) - steps['safety: classifier'] + before)
  rows['1 process: per-document steps'] = rate(sum(steps.values()))
  rows['1 process: dedup'] = rate(dedup_seconds(data_cfg, outcomes))
  for executor, beam in (('prepare', False), ('Beam DirectRunner', True))[:1 + args.beam]:
    for stage, seconds in prepare_stages(data_cfg.copy_and_resolve_references(), args.workers, beam).items():
      # In one process, SentencePiece tokenizes on a thread per core; its trainer is mostly one thread.
      cores = {'clean': args.workers, 'tokenizer training': 1}.get(stage, args.workers if beam else os.cpu_count())
      rows[f'{executor}, {args.workers} workers: {stage}'] = rate(seconds, cores)
  kept = sum(1 for o in outcomes if not o.dropped)
  print(f'{part}: {len(records):,} documents, {mb:.1f} MB; {kept:,} pass the per-document steps', flush=True)
  return rows


def bench_pipeline(batches: int, max_docs: int) -> float:
  """Tokens/s of packed, shuffled quickstart training batches from the Grain pipeline."""
  config = quickstart.get_config()
  config.data.max_docs = max_docs
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
  parser.add_argument('--corpus_dir', default='~/.cache/jaxgpt/bench_corpus', help='where the corpus is cached')
  parser.add_argument('--mb', type=float, default=0, help='MB of each part to measure; 0 = all')
  parser.add_argument('--workers', type=int, default=2, help='cleaning processes for the prepare and Beam rows')
  parser.add_argument('--beam', action='store_true', help="also prepare on Beam's DirectRunner")
  parser.add_argument('--batches', type=int, default=200, help='Grain pipeline batches to time')
  parser.add_argument('--train_tokens_per_s', type=float, default=9200.0,
                      help="what the quickstart's training step consumes (README, 2-core CPU)")
  parser.add_argument('--small', action='store_true',
                      help='a 2 MB corpus, 1 worker, 10 batches of 100 files: seconds, for tests')
  args = parser.parse_args()
  if args.beam and importlib.util.find_spec('apache_beam') is None:
    raise SystemExit('--beam needs Apache Beam: pip install -e ".[beam]"')
  corpus_dir = os.path.expanduser(args.corpus_dir)
  if args.small:
    corpus_dir, args.workers, args.batches = os.path.join(corpus_dir, 'small'), 1, 10
  manifest = build_corpus(corpus_dir, _SMALL_MB if args.small else _FULL_MB)
  print(f'corpus in {corpus_dir}: ' + '; '.join(
      f'{part} {m["mb"]} MB, {m["documents"]:,} documents (' + ', '.join(
          f'{o} {v["mb"]} MB' for o, v in m['origins'].items()) + ')' for part, m in manifest.items()))

  results = {part: bench_part(part, corpus_dir, args) for part in PARTS}
  # The prose rows first: they have every step the code has, in order, and the safety steps.
  stages = list(dict.fromkeys(stage for rows in sorted(results.values(), key=len, reverse=True) for stage in rows))
  width = max(map(len, stages))
  print(f'\n{"MB/s per core":<{width}}  ' + '  '.join(f'{part:>8}' for part in PARTS))
  for stage in stages:
    print(f'{stage:<{width}}  ' + '  '.join(
        f'{results[part][stage]:8.2f}' if stage in results[part] else f'{"-":>8}' for part in PARTS))
  for part, rows in results.items():
    slowest = min((s for s in rows if s.startswith('1 process: ') and 'before' not in s and 'steps' not in s
                   and 'same lines' not in s), key=rows.get)
    print(f'slowest stage in one process, {part}: {slowest.removeprefix("1 process: ")} ({rows[slowest]:.2f} MB/s)')
    for executor in ('prepare', 'Beam DirectRunner')[:1 + args.beam]:
      stages = [s for s in rows if s.startswith(f'{executor}, ')]
      slowest = min(stages, key=rows.get)
      print(f'slowest stage of {slowest.split(":")[0]}, {part}: {slowest.split(": ", 1)[1]} '
            f'({rows[slowest]:.2f} MB/s per core)')

  tokens_s = bench_pipeline(args.batches, max_docs=100 if args.small else 0)
  ratio = tokens_s / args.train_tokens_per_s
  print(f'Grain pipeline: {tokens_s:,.0f} tokens/s = {ratio:.0f}x the {args.train_tokens_per_s:,.0f} tokens/s '
        f"training consumes ({'meets' if ratio >= 10 else 'misses'} the 10x goal)")


if __name__ == '__main__':
  main()
