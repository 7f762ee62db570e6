"""The cleaning stage as an Apache Beam pipeline: the same result as corpus.py, on many machines.

`python -m jaxgpt.prepare --config ... --config.data.executor=beam --config.data.beam_args='--runner=...'`
(docs/data.md, "Preparing on Apache Beam"). This process streams the source's records through the source's
own reader, as the local executor does, numbering them, into batch files under the pipeline's
`--temp_location` (or the cache being built, when none is given): every kind of source then yields exactly the
same records. The workers run the same `Cleaner` on them and deduplicate by the rule in dedup.py: exact
duplicates by a GroupByKey on the text hash, near ones by a GroupByKey per LSH band key, whose groups yield the
linked pairs (a spanning forest each). The connected groups are then found in ONE worker over all links
(`dedup.keepers`): exactness matters more than elegance here, and the links are few (fewer than the near
duplicates), while label propagation in Beam would shuffle every document once per link of the longest chain.

Survivors are written sorted by source order in parts (`_DOCUMENTS_PER_PART` per file) next to the batches,
with the report's counts of what was read and dropped. This process then streams the parts in order through
`corpus.write_kept`, as the local executor does: the split, the train/validation files, the kept/changed/
flagged counts, and the tokenizer and TFDS array_record files that follow are the local executor's code. The
scratch directory has a fresh random name and is removed at the end; a run killed midway leaves it, and no
report.json, so no later run reads it.
"""

import dataclasses
import heapq
import json
import pickle
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

_RECORDS_PER_BATCH = 4096  # staged records per file, or fewer when they hold _BATCH_BYTES
_BATCH_BYTES = 64 << 20
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
    batches = _stage_records(source, parts)
    with beam.Pipeline(options=options) as pipeline:
      _clean(pipeline, batches, data_cfg, str(parts))
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


def _clean(pipeline, batches: list[str], data_cfg, parts: str) -> None:
  """The pipeline: staged records -> Cleaner -> exact dedup -> near dedup -> sorted parts, and the tallies."""
  clean_cfg = data_cfg.clean
  records = (pipeline | 'Batches' >> beam.Create(batches) | 'Spread batches' >> beam.Reshuffle()
             | 'Records' >> beam.FlatMap(_read_batch) | 'Spread' >> beam.Reshuffle())
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


def _stage_records(source: sources.Source, parts) -> list[str]:
  """Writes (order, Record) for every record of the source, in batches, under `parts`; returns the batch files.

  The source's own reader streams them, so every kind of source, its shards, compression, data.max_docs and
  bad-shard handling give exactly the records the local executor reads, numbered alike. A file tree's records
  are paths (its workers read the files); other records carry their raw text.
  """
  batches, batch, size = [], [], 0
  for order, record in enumerate(source.records()):
    batch.append((order, record))
    size += record.size
    if len(batch) == _RECORDS_PER_BATCH or size >= _BATCH_BYTES:
      batches.append(_write_batch(parts, len(batches), batch))
      batch, size = [], 0
  if batch:
    batches.append(_write_batch(parts, len(batches), batch))
  return batches


def _write_batch(parts, number: int, batch: list) -> str:
  path = parts / f'records-{number:09d}.pickle'
  path.write_bytes(pickle.dumps(batch))
  return str(path)


def _read_batch(path: str) -> list:
  return pickle.loads(paths.path(path).read_bytes())


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
