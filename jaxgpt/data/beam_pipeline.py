"""Data preparation as Apache Beam pipelines: the dataset the local executor makes, made by many workers.

`python -m jaxgpt.prepare --config ... --config.data.executor=beam --config.data.beam_args='--runner=...'`
(docs/data.md, "Preparing on Apache Beam"). builder.py runs two pipelines, and between them, in this process,
what needs one place:

1. `clean_corpus`. The workers read the source's units (shards, groups of files, index ranges:
   `Source.units`) with the source's own reader, so compression, bad shards and `on_bad_shard` behave as in
   one process. Each record gets the order the local executor's stream gives it (its place in its unit plus
   the records of the units before it) and data.max_docs keeps the first that many. The workers clean each
   record with the same `Cleaner` and deduplicate by the rule in dedup.py: exact duplicates by a GroupByKey
   on the text hash, near ones by a GroupByKey per LSH band key, whose groups yield the linked pairs (a
   spanning forest each). The connected groups are then found in ONE worker over all links
   (`dedup.keepers`): exactness matters more than elegance here, and the links are few (fewer than the near
   duplicates), while label propagation in Beam would shuffle every document once per link of the longest
   chain. Survivors are written sorted by order in parts (`_DOCUMENTS_PER_PART` per file), with the report's
   counts of what was read and dropped.
2. This process streams the parts through `corpus.write_kept`, the local executor's code: the split, the
   train/validation files, the kept/changed/flagged counts. builder.py then trains the tokenizer on a sample
   of the train split (or loads one).
3. `write_tokenized`. The workers read the split files in pieces of whole lines, tokenize them as builder.py
   does (the tokenizer travels as its serialized bytes), and TFDS's own Beam writer shuffles and writes the
   array_record shards: the same examples under the same keys (line numbers), so in the same order, as the
   local executor's TFDS writer.

Each pipeline's files go in a scratch directory with a fresh random name under --temp_location (which the
workers must reach), or under the cache being built, removed at the end. A run killed midway leaves no
report.json, so no later run takes what it left for a cache.
"""

import collections
import contextlib
import dataclasses
import heapq
import itertools
import json
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Iterator

import apache_beam as beam
import ml_collections
from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, PipelineOptions, StandardOptions

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data import corpus, dedup, sources
from jaxgpt.data.clean import Cleaner
from jaxgpt.data.corpus import Survivor, write_kept
from jaxgpt.data.report import SPLITS, Report
from jaxgpt.data.tokenizer import Tokenizer

_DOCUMENTS_PER_PART = 4096  # consecutive orders per output file: what one worker sorts in memory
_PIECE_BYTES = 4 << 20  # bytes of a split file per piece a worker tokenizes, in whole lines
_COPY_BYTES = 16 << 20
_EXAMPLES = 5  # examples kept per reason, smallest orders first: as many as the report shows
_TALLIES_FILE = 'tallies.json'


def pipeline_options(data_cfg, pipeline_args=()) -> PipelineOptions:
  return PipelineOptions([*pipeline_args, *shlex.split(data_cfg.beam_args)])


@contextlib.contextmanager
def _scratch(options: PipelineOptions, directory: str) -> Iterator:
  """A new directory that this process and the workers share: under --temp_location, else under `directory`."""
  root = options.view_as(GoogleCloudOptions).temp_location or directory
  scratch = paths.path(root) / f'jaxgpt-beam-{uuid.uuid4().hex[:12]}'  # new each run: no leftovers read
  scratch.mkdir(parents=True)
  try:
    yield scratch
  finally:
    scratch.rmtree(missing_ok=True)


def clean_corpus(source: sources.Source, data_cfg, directory: str, report: Report, pipeline_args=()) -> None:
  """Cleans, deduplicates and splits `source` into `directory` like corpus.clean_corpus, on the Beam runner that
  `pipeline_args` and data.beam_args name (--runner=DirectRunner by default), counting everything in `report`."""
  options = pipeline_options(data_cfg, pipeline_args)
  start = time.time()
  with _scratch(options, directory) as scratch:
    with beam.Pipeline(options=options) as pipeline:
      _clean(pipeline, source, data_cfg, str(scratch))
    _count(json.loads((scratch / _TALLIES_FILE).read_text()), report)
    write_kept(_read_parts(scratch), data_cfg, directory, report, source.root)
  seconds = max(time.time() - start, 1e-9)
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  report.speed.update(workers=options.view_as(DirectOptions).direct_num_workers if runner == 'DirectRunner' else 0,
                      runner=runner, clean_seconds=round(seconds, 3), docs_per_s=report.read['documents'] / seconds,
                      mb_per_s=report.read['bytes'] / 1e6 / seconds)


def _count(tallies: list, report: Report) -> None:
  """The pipeline's tallies into `report`; the first error (the smallest order), as the local executor says it."""
  errors = [message for (section, _), (_, _, examples) in tallies if section == 'error' for _, message, _ in examples]
  if errors:
    raise JaxgptError(errors[0])
  for (section, reason), (count, size, examples) in tallies:
    if section == 'read':
      report.read.update(documents=count, bytes=size)
      continue
    tally = getattr(report, section)
    for _, where, detail in examples:
      tally.add(reason, where, detail)
    tally.counts[reason] = count


def _clean(pipeline, source: sources.Source, data_cfg, scratch: str) -> None:
  """The pipeline: units -> numbered records -> Cleaner -> exact dedup -> near dedup -> sorted parts, and the
  tallies."""
  clean_cfg = data_cfg.clean
  read = (pipeline | 'Units' >> beam.Create(list(enumerate(source.units()))) | 'Spread units' >> beam.Reshuffle()
          | 'Read' >> beam.FlatMap(_read_unit, source, data_cfg.max_docs))
  offsets = (read | 'Unit' >> beam.Map(lambda item: item[0][0]) | 'Per unit' >> beam.combiners.Count.PerElement()
             | 'All units' >> beam.combiners.ToList() | 'Offsets' >> beam.Map(_offsets))
  numbered = read | 'Number' >> beam.FlatMap(_numbered, beam.pvalue.AsSingleton(offsets), data_cfg.max_docs
                                             ).with_outputs('error', main='record')
  records = numbered.record | 'Spread' >> beam.Reshuffle()
  outcomes, errors = records | 'Clean' >> beam.ParDo(_Clean(data_cfg.to_dict())).with_outputs('error', main='ok')
  tallies = [numbered.error, errors,
      records | 'Count read' >> beam.Map(lambda r: (('read', ''), (r[0], r[1].size, '', ''))),
      outcomes | 'Dropped' >> beam.Filter(lambda o: o[1].dropped) | 'Count dropped' >> beam.Map(
          lambda o: (('dropped', o[1].dropped), (o[0], 0, o[1].record.where, o[1].detail)))]
  kept = outcomes | 'Not dropped' >> beam.Filter(lambda o: not o[1].dropped)
  if clean_cfg.exact_dedup:
    grouped = (kept | 'By text hash' >> beam.Map(lambda o: (o[1].exact_key, o)) | 'Same text' >> beam.GroupByKey()
               | 'Earliest copy' >> beam.ParDo(_earliest_copy).with_outputs('duplicate', main='kept'))
    kept = grouped.kept
    tallies.append(grouped.duplicate)
  survivors = kept | 'Survivors' >> beam.Map(lambda o: (o[0], Survivor.of(*o)))
  if clean_cfg.near_dedup:
    threshold = clean_cfg.near_dedup_threshold
    bands = dedup.lsh_bands(threshold, clean_cfg.num_perm)
    originals = (
        kept
        | 'Band keys' >> beam.FlatMap(_band_entries, bands)
        | 'Same band' >> beam.GroupByKey()
        | 'Links' >> beam.FlatMap(lambda bucket: _links(bucket[1], threshold))
        | 'All links' >> beam.combiners.ToList()
        | 'Groups' >> beam.FlatMap(lambda links: [(order, where) for (order, _), (_, where) in
                                                  dedup.keepers(links).items()]))
    survivors = ({'survivor': survivors, 'original': originals} | 'Join' >> beam.CoGroupByKey()
                 | 'Near duplicates' >> beam.Map(_with_original))
  _ = (survivors | 'By part' >> beam.Map(lambda s: (s[0] // _DOCUMENTS_PER_PART, s[1]))
       | 'Part' >> beam.GroupByKey() | 'Write parts' >> beam.Map(_write_part, scratch))
  _ = (tallies | 'All tallies' >> beam.Flatten() | 'Tally' >> beam.CombinePerKey(_Tally())
       | 'Every tally' >> beam.combiners.ToList()
       | 'Write tallies' >> beam.Map(_write_json, str(paths.path(scratch) / _TALLIES_FILE)))


@dataclasses.dataclass(frozen=True)
class _ReadError:
  message: str


def _read_unit(element, source: sources.Source, max_docs: int) -> Iterator:
  """((unit, index), record) for a unit's records, data.max_docs at most (no more of them can be kept). A unit that
  stops preparation (data.on_bad_shard='error') gives a _ReadError in the place where it stopped."""
  number, unit = element
  index = 0
  try:
    for record in itertools.islice(source.read_unit(unit), max_docs or None):
      yield (number, index), record
      index += 1
  except JaxgptError as e:
    yield (number, index), _ReadError(str(e))


def _offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
  """unit -> how many records the units before it hold: the order of its first record."""
  units, sizes = zip(*sorted(counts)) if counts else ((), ())
  return dict(zip(units, itertools.accumulate(sizes, initial=0)))


def _numbered(element, offsets: dict[int, int], max_docs: int) -> Iterator:
  """(order, record) in the local executor's numbering, the first data.max_docs only; an error as 'error'."""
  (unit, index), item = element
  order = offsets[unit] + index
  if max_docs and order >= max_docs:
    return
  if isinstance(item, _ReadError):  # said once, at the end, unless an earlier record stops preparation first
    yield beam.pvalue.TaggedOutput('error', (('error', ''), (order, 0, item.message, '')))
  else:
    yield order, item


class _Clean(beam.DoFn):
  """The local executor's Cleaner, one per worker; outcomes leave without the raw payload, errors as 'error'."""

  def __init__(self, data_cfg_dict: dict):
    self._cfg = data_cfg_dict

  def setup(self):
    self._cleaner = Cleaner(ml_collections.ConfigDict(self._cfg))

  def process(self, element):
    order, record = element
    try:
      outcome = self._cleaner(record)
    except JaxgptError as e:  # bad input that stops preparation (data.on_bad_utf8='error'): said once, at the end
      yield beam.pvalue.TaggedOutput('error', (('error', ''), (order, 0, str(e), '')))
      return
    yield order, dataclasses.replace(outcome, record=dataclasses.replace(record, payload=b''))


def _earliest_copy(group):
  """Keeps the earliest of the documents with one text hash; the others are its exact duplicates."""
  _, copies = group
  earliest, original = min((order, outcome.record.where) for order, outcome in copies)
  for order, outcome in copies:
    if order == earliest:
      yield order, outcome
    else:
      yield beam.pvalue.TaggedOutput('duplicate', (('dropped', 'exact duplicate'),
                                                   (order, 0, outcome.record.where, f'of {original}')))


def _band_entries(element, bands: tuple[int, int]):
  """(band key, ((order, where), signature)) for each band of a document's signature."""
  order, outcome = element
  values = dedup.signature_values(outcome.signature)
  return [(key, ((order, outcome.record.where), values)) for key in dedup.band_keys(values, *bands)]


def _links(members, threshold: float) -> list:
  members = list(members)
  return dedup.bucket_links(members, threshold) if len(members) > 1 else []


def _with_original(joined):
  order, found = joined
  (survivor,) = found['survivor']
  if found['original']:
    (original,) = found['original']
    survivor = dataclasses.replace(survivor, near_original=original, text='')  # dropped: no text needed
  return order, survivor


def _write_part(part, scratch: str) -> None:
  number, survivors = part
  lines = (json.dumps(dataclasses.asdict(s), ensure_ascii=False) + '\n'
           for s in sorted(survivors, key=lambda s: s.order))
  (paths.path(scratch) / f'part-{number:09d}.jsonl').write_text(''.join(lines))


def _read_parts(scratch) -> Iterator[Survivor]:
  for part in sorted(scratch.glob('part-*.jsonl')):
    with part.open() as f:
      for line in f:
        yield Survivor(**json.loads(line))


class _Tally(beam.CombineFn):
  """Per (section, reason): documents, bytes and the examples with the smallest orders (order, where, detail)."""

  def create_accumulator(self):
    return 0, 0, []

  def add_input(self, accumulator, element):
    order, size, where, detail = element
    count, total, examples = accumulator
    return count + 1, total + size, heapq.nsmallest(_EXAMPLES, examples + [(order, where, detail)])

  def merge_accumulators(self, accumulators):
    accumulators = list(accumulators)
    return (sum(a[0] for a in accumulators), sum(a[1] for a in accumulators),
            heapq.nsmallest(_EXAMPLES, (e for a in accumulators for e in a[2])))

  def extract_output(self, accumulator):
    return accumulator


def _write_json(value, file: str) -> None:
  paths.path(file).write_text(json.dumps(value))


def write_tokenized(directory: str, dataset_dir: str, tokenizer: Tokenizer, data_cfg, counts: dict,
                    pipeline_args=()) -> None:
  """Tokenizes the split files in `directory` on the workers into builder.TokenizedText's dataset under
  `dataset_dir` (which the workers must reach), counting documents, bytes, tokens and unknown tokens per split
  in `counts`, as builder.py does in one process."""
  # TFDS, and Grain through builder.py: imported for this stage only, not by the cleaning stage's workers.
  import tensorflow_datasets as tfds

  from jaxgpt.data import builder
  options = pipeline_options(data_cfg, pipeline_args)
  _, features = builder._encoding(data_cfg.format)
  with _scratch(options, directory) as scratch:
    examples = {}
    for split in SPLITS:
      file = corpus.clean_file(directory, split)
      pieces = _pieces(file)
      if options.view_as(GoogleCloudOptions).temp_location:  # the workers may not reach this machine's disk
        file = _copy(file, str(scratch / os.path.basename(file)))
      examples[split] = _TokenizedSplit(file, pieces, tokenizer.serialized, data_cfg.format,
                                        str(scratch / f'counts-{split}.json'))
    dataset = builder.TokenizedOnWorkers(documents=examples, features=features, data_dir=dataset_dir,
                                         file_format='array_record')
    dataset.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=options))
    for split in SPLITS:
      counts[split].update(json.loads((scratch / f'counts-{split}.json').read_text()))


def _pieces(file: str) -> list[tuple[int, int, int]]:
  """(first byte, end byte, number of the first line) of the file's consecutive runs of whole lines, each about
  _PIECE_BYTES (or one long line)."""
  pieces, start, first, end, lines = [], 0, 0, 0, 0
  with open(file, 'rb') as f:
    for line in f:
      end, lines = end + len(line), lines + 1
      if end - start >= _PIECE_BYTES:
        pieces.append((start, end, first))
        start, first = end, lines
  if end > start:
    pieces.append((start, end, first))
  return pieces


def _copy(source: str, target: str) -> str:
  with paths.path(source).open('rb') as reader, paths.path(target).open('wb') as writer:
    shutil.copyfileobj(reader, writer, _COPY_BYTES)
  return target


class _TokenizedSplit(beam.PTransform):
  """(line number, example) for every line of a split file, tokenized by the workers a piece at a time; the split's
  counts go to `counts_file`."""

  def __init__(self, file: str, pieces: list, tokenizer: bytes, data_format: str, counts_file: str):
    super().__init__()
    self._file, self._pieces, self._tokenizer, self._format = file, pieces, tokenizer, data_format
    self._counts_file = counts_file

  def expand(self, root):
    tokenized = (root | 'Pieces' >> beam.Create(self._pieces) | 'Spread pieces' >> beam.Reshuffle()
                 | 'Tokenize' >> beam.ParDo(_Tokenize(self._file, self._tokenizer, self._format)
                                            ).with_outputs('counts', main='examples'))
    _ = (tokenized.counts | 'Sum counts' >> beam.CombineGlobally(lambda counts: sum(counts, collections.Counter()))
         | 'Write counts' >> beam.Map(_write_json, self._counts_file))
    return tokenized.examples


class _Tokenize(beam.DoFn):
  """A piece of a split file -> (line number, example), by builder.py's own encoding; its counts as 'counts'."""

  def __init__(self, file: str, tokenizer: bytes, data_format: str):
    self._file, self._serialized, self._format = file, tokenizer, data_format

  def setup(self):
    from jaxgpt.data import builder  # (see write_tokenized)
    self._tokenized = builder._tokenized
    self._tokenizer = Tokenizer.from_bytes(self._serialized)
    self._encode, _ = builder._encoding(self._format)

  def process(self, piece):
    start, end, first = piece
    with paths.path(self._file).open('rb') as f:
      f.seek(start)
      lines = f.read(end - start).splitlines()
    counts = collections.Counter()
    texts = (json.loads(line)['text'] for line in lines)
    yield from enumerate(self._tokenized(texts, self._tokenizer, counts, self._encode), start=first)
    yield beam.pvalue.TaggedOutput('counts', counts)
