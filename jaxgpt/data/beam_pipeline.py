"""The cleaning stage as an Apache Beam pipeline: the same result as corpus.py, on many machines.

`python -m jaxgpt.prepare --config ... --config.data.executor=beam --config.data.beam_args='--runner=...'`
(docs/data.md, "Preparing on Apache Beam"). Workers read the source (a file tree's files; a JSONL file in byte ranges, numbered by a first
pass that counts each range's lines; a TFDS source is read by the launching process), run the same `Cleaner`
as the local executor, and deduplicate by the rule in dedup.py: exact duplicates by a GroupByKey on the text
hash, near ones by a GroupByKey per LSH band key, whose groups yield the linked pairs (a spanning forest each).
The connected groups are then found in ONE worker over all links (`dedup.keepers`): exactness matters more than
elegance here, and the links are few (fewer than the near duplicates, whatever the corpus size), while label
propagation in Beam would take as many shuffles of every document as the longest chain is long.

Survivors are written sorted by source order in parts (`_DOCUMENTS_PER_PART` per file) under the pipeline's
`--temp_location` (or the cache being built, when none is given), with the report's counts of what was read
and dropped. This process then streams the parts in order through `corpus.write_kept`, as the local executor
does: the split, the train/validation files, the kept/changed/flagged counts and the tokenizer and TFDS
array_record files that follow are the local executor's code. A run killed midway leaves only a part directory
with a fresh random name, which no later run reads.
"""

import dataclasses
import heapq
import json
import shlex
import time
import uuid
from collections.abc import Iterator

import apache_beam as beam
import ml_collections
from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, PipelineOptions, StandardOptions

from jaxgpt import paths
from jaxgpt.config import JaxgptError
from jaxgpt.data import dedup, sources
from jaxgpt.data.clean import Cleaner
from jaxgpt.data.corpus import Survivor, write_kept
from jaxgpt.data.report import Report

_RANGE_BYTES = 64 << 20  # a JSONL file is read in ranges of this size, in parallel
_DOCUMENTS_PER_PART = 4096  # consecutive orders per output file: what one worker sorts in memory
_EXAMPLES = 5  # examples kept per reason, smallest orders first: as many as the report shows
_TALLIES_FILE = 'tallies.json'


def clean_corpus(source: sources.Source, data_cfg, directory: str, report: Report, pipeline_args=()) -> None:
  """Cleans, deduplicates and splits `source` into `directory` like corpus.clean_corpus, on the Beam runner that
  `pipeline_args` and data.beam_args name (--runner=DirectRunner by default), counting everything in `report`."""
  options = PipelineOptions([*pipeline_args, *shlex.split(data_cfg.beam_args)])
  scratch = options.view_as(GoogleCloudOptions).temp_location or directory
  parts = paths.path(scratch) / f'jaxgpt-beam-{uuid.uuid4().hex[:12]}'  # new each run: no leftovers read
  parts.mkdir(parents=True)
  start = time.time()
  try:
    with beam.Pipeline(options=options) as pipeline:
      _clean(pipeline, source, data_cfg, str(parts))
    tallies = json.loads((parts / _TALLIES_FILE).read_text())
    errors = [message for (section, _), (_, _, examples) in tallies if section == 'error' for _, message, _ in examples]
    if errors:  # the local executor stops at the first; this is the same one, found after the others
      raise JaxgptError(errors[0])
    for (section, reason), (count, size, examples) in tallies:
      if section == 'read':
        report.read.update(documents=count, bytes=size)
        continue
      tally = getattr(report, section)
      for _, where, detail in examples:
        tally.add(reason, where, detail)
      tally.counts[reason] = count
    write_kept(_read_parts(parts), data_cfg, directory, report, source.root)
  finally:
    parts.rmtree(missing_ok=True)
  seconds = max(time.time() - start, 1e-9)
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  report.speed.update(workers=options.view_as(DirectOptions).direct_num_workers if runner == 'DirectRunner' else 0,
                      runner=runner, clean_seconds=round(seconds, 3), docs_per_s=report.read['documents'] / seconds,
                      mb_per_s=report.read['bytes'] / 1e6 / seconds)


def _clean(pipeline, source: sources.Source, data_cfg, parts: str) -> None:
  """The pipeline: records -> Cleaner -> exact dedup -> near dedup -> sorted parts, and the tallies."""
  clean_cfg = data_cfg.clean
  records = _records(pipeline, source, data_cfg) | 'Spread' >> beam.Reshuffle()
  outcomes, errors = records | 'Clean' >> beam.ParDo(_Clean(data_cfg.to_dict())).with_outputs('error', main='ok')
  tallies = [errors,
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
       | 'Part' >> beam.GroupByKey() | 'Write parts' >> beam.Map(_write_part, parts))
  _ = (tallies | 'All tallies' >> beam.Flatten() | 'Tally' >> beam.CombinePerKey(_Tally())
       | 'Every tally' >> beam.combiners.ToList()
       | 'Write tallies' >> beam.Map(lambda t: (paths.path(parts) / _TALLIES_FILE).write_text(json.dumps(t))))


def _records(pipeline, source: sources.Source, data_cfg):
  """(order, Record) for every record of the source, order being its position in source.records()."""
  if not isinstance(source, sources.JsonLines):  # files are read by the workers; TFDS examples by this process
    return pipeline | 'Records' >> beam.Create(list(enumerate(source.records())))
  ranges = pipeline | 'Byte ranges' >> beam.Create(byte_ranges(paths.stat(source.root).size, _RANGE_BYTES))
  counts = ranges | 'Count lines' >> beam.Map(lambda r: (r[0], sum(1 for _ in lines_in(source.root, *r))))
  return ranges | 'Read lines' >> beam.FlatMap(numbered_records, source.root, data_cfg.id_field, data_cfg.max_docs,
                                               beam.pvalue.AsDict(counts))


def byte_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
  return [(start, min(start + range_bytes, size)) for start in range(0, size, range_bytes)]


def lines_in(file: str, start: int, end: int) -> Iterator[bytes]:
  """The lines of `file` that start at a byte offset in [start, end), as iterating the file yields them."""
  with paths.path(file).open('rb') as f:
    if start:
      f.seek(start - 1)
      f.readline()  # the rest of the line holding byte start - 1: it starts in an earlier range
    while f.tell() < end and (line := f.readline()):
      yield line


def numbered_records(byte_range, file: str, id_field: str, max_docs: int, counts: dict):
  """(order, Record) for the lines starting in `byte_range`, as JsonLines.records() makes them; `counts` holds
  the number of lines starting in each range, by the range's start."""
  first = 1 + sum(n for start, n in counts.items() if start < byte_range[0])  # the range's first line number
  for number, line in enumerate(lines_in(file, *byte_range), start=first):
    if max_docs and number > max_docs:
      return
    yield number - 1, sources.Record(sources.jsonl_key(line, id_field), f'{file}:{number}', len(line), line)


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


def _write_part(part, parts: str) -> None:
  number, survivors = part
  lines = (json.dumps(dataclasses.asdict(s), ensure_ascii=False) + '\n'
           for s in sorted(survivors, key=lambda s: s.order))
  (paths.path(parts) / f'part-{number:09d}.jsonl').write_text(''.join(lines))


def _read_parts(parts) -> Iterator[Survivor]:
  for part in sorted(parts.glob('part-*.jsonl')):
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
