"""Near-duplicate detection at each setting: recall on planted copies, false positives on distinct documents.

  python tools/near_dup_recall.py                      # the grid behind the defaults (docs/data.md)
  python tools/near_dup_recall.py --shingle_sizes 3 --thresholds 0.5 --num_perms 128,256 --copies 5
  python tools/near_dup_recall.py --quickstart         # also: files the quickstart corpus loses per setting

Two genres of real text on this machine, each from one author, cut into
documents of at least --min_words words (consecutive paragraphs of one file,
so sections of one long text are distinct documents of the same author):

  prose  Vim's help files (Bram Moolenaar's manual, /usr/share/vim/vim*/doc/*.txt)
  code   the running Python's standard library (.py, without tests, site-packages
         and the generated codec tables in encodings/)

--docs documents are drawn from each genre (seeded). Every copy gets
round(rate * words) edits at distinct random word positions, each a
substitution, an insertion or a deletion (equally likely) with words drawn
from the same genre. The measurement uses jaxgpt's own code: signatures from
`clean.minhash` (the shingles dedup uses) and the rule of `dedup.py` (a shared
LSH band and an estimated Jaccard similarity at the threshold links two
documents). The distinct documents go through a `dedup.Deduplicator`: each one
it drops as a near duplicate of another is a false positive. A copy is recalled
when the rule links it to its own original.
`shared` columns are the share of overlapping documents that are
flagged: each as long as a document, starting with that share of its words and
going on with another document's (a quoted or excerpted text, not a copy; at
70% its Jaccard similarity is about 0.54). `J` columns are the copies' mean
estimated Jaccard similarity with their originals; `max J` is the largest
between two distinct documents.
"""

import argparse
import glob
import os
import random
import re
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.data import clean, dedup, sources  # noqa: E402

OPERATIONS = ('substitute', 'insert', 'delete')
_VIM_DOCS = '/usr/share/vim/vim*/doc/*.txt'
_STDLIB_SKIP = re.compile(r'(^|/)(site-packages|test|tests|idle_test|encodings|__pycache__)/')


def _floats(text):
  return [float(x) for x in text.split(',')]


def _ints(text):
  return [int(x) for x in text.split(',')]


def edit_words(text: str, rate: float, vocabulary: list[str], rng: random.Random) -> str:
  """The text with round(rate * words) random words substituted, inserted after, or deleted.

  Words are whitespace-separated, as MinHash shingles see them; the copy joins them with single spaces.
  """
  words = text.split()
  positions = sorted(rng.sample(range(len(words)), round(rate * len(words))), reverse=True)
  for i in positions:  # from the end, so earlier positions keep their meaning
    operation = rng.choice(OPERATIONS)
    if operation == 'substitute':
      words[i] = rng.choice(vocabulary)
    elif operation == 'insert':
      words.insert(i + 1, rng.choice(vocabulary))
    else:
      del words[i]
  return ' '.join(words)


def shared_start(text: str, other: str, share: float) -> str:
  """As long as `text`: its first `share` of words, then the start of `other` (an overlap, not a copy)."""
  words = text.split()
  kept = round(share * len(words))
  return ' '.join(words[:kept] + other.split()[:len(words) - kept])


def sections(path: str, min_words: int) -> list[tuple[str, str]]:
  """(name, text): the file cut at blank lines into consecutive pieces of at least `min_words` words."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (UnicodeDecodeError, OSError):
    return []
  pieces, current, words = [], [], 0
  for paragraph in re.split(r'\n\s*\n', text):
    current.append(paragraph)
    words += len(paragraph.split())
    if words >= min_words:
      pieces.append('\n\n'.join(current))
      current, words = [], 0
  name = path.replace(os.path.expanduser('~'), '~')
  return [(f'{name}#{i}', piece) for i, piece in enumerate(pieces)]


def genre_documents(genre: str, min_words: int) -> list[tuple[str, str]]:
  if genre == 'prose':
    paths = sorted(glob.glob(_VIM_DOCS))
  else:
    stdlib = sysconfig.get_paths()['stdlib']
    paths = sorted(p for p in glob.glob(os.path.join(stdlib, '**/*.py'), recursive=True)
                   if not _STDLIB_SKIP.search(os.path.relpath(p, stdlib)))
  return [doc for path in paths for doc in sections(path, min_words)]


class Genre:
  """Sampled distinct documents of one genre and their planted copies at each edit rate."""

  def __init__(self, name: str, args, rng: random.Random):
    self.name = name
    everything = genre_documents(name, args.min_words)
    if not everything:
      raise SystemExit(f'no {name} documents on this machine ({_VIM_DOCS if name == "prose" else "stdlib"})')
    self.docs = rng.sample(everything, min(args.docs, len(everything)))
    self.docs.sort()  # source order: files, then sections within a file
    vocabulary = [w for _, text in everything for w in text.split()]
    # copies[rate] = [(index of the original, text)]
    self.copies = {rate: [(i, edit_words(text, rate, vocabulary, rng))
                          for i, (_, text) in enumerate(self.docs) for _ in range(args.copies)]
                   for rate in args.rates}
    # mixed[share] = [(i, the first `share` of document i's words, then words of the next document)]
    self.mixed = {share: [(i, shared_start(text, self.docs[(i + 1) % len(self.docs)][1], share))
                          for i, (_, text) in enumerate(self.docs)]
                  for share in args.shared}
    lengths = [len(t.split()) for _, t in self.docs]
    print(f'{name}: {len(self.docs)} of {len(everything)} documents, {min(lengths):,}-{max(lengths):,} words '
          f'(median {int(np.median(lengths)):,}); {args.copies} cop{"y" if args.copies == 1 else "ies"} '
          f'of each per edit rate', file=sys.stderr)


def _estimated_jaccard(a, b) -> float:
  return float(np.mean(a.hashvalues == b.hashvalues))


def _linked(a, b, threshold: float, bands: tuple[int, int]) -> bool:
  """Whether deduplication links the two signatures: a shared band key, and the similarity at the threshold."""
  a, b = dedup.signature_values(a), dedup.signature_values(b)
  shared = set(dedup.band_keys(a, *bands)) & set(dedup.band_keys(b, *bands))
  return bool(shared) and bool(dedup.bucket_links([(0, a), (1, b)], threshold))


def _outcome(name: str, signature) -> clean.Outcome:
  return clean.Outcome(sources.Record(name, name, 0, b''), text='', signature=signature)


def measure(genre: Genre, shingle_size: int, num_perm: int, thresholds: list[float]) -> dict:
  """threshold -> {'recall': {rate: fraction}, 'false': [(doc, kept doc)], ...} for one genre."""
  originals = [clean.minhash(text, shingle_size, num_perm) for _, text in genre.docs]
  copies = {rate: [(i, clean.minhash(text, shingle_size, num_perm)) for i, text in planted]
            for rate, planted in genre.copies.items()}
  mixed = {share: [(i, clean.minhash(text, shingle_size, num_perm)) for i, text in planted]
           for share, planted in genre.mixed.items()}
  values = np.stack([s.hashvalues for s in originals])
  similar = np.zeros((len(originals),) * 2)
  for i in range(len(originals)):
    similar[i] = np.mean(values == values[i], axis=1)
  np.fill_diagonal(similar, 0)
  common = {'max_j': float(similar.max()),
            'copy_j': {rate: float(np.mean([_estimated_jaccard(s, originals[i]) for i, s in planted]))
                       for rate, planted in copies.items()}}
  results = {}
  for threshold in thresholds:
    clean_cfg = base_config().data.clean
    clean_cfg.update(exact_dedup=False, near_dedup_threshold=threshold, num_perm=num_perm)
    deduplicator = dedup.Deduplicator(clean_cfg)  # the distinct documents alone: any group is a false positive
    for i, signature in enumerate(originals):
      deduplicator.exact_original(i, _outcome(genre.docs[i][0], signature))
    false = [(genre.docs[i][0], kept) for i, kept in sorted(deduplicator.near_originals().items())]
    bands = dedup.lsh_bands(threshold, num_perm)
    recall = {rate: float(np.mean([_linked(s, originals[i], threshold, bands) for i, s in planted]))
              for rate, planted in copies.items()}
    flagged = {share: float(np.mean([_linked(s, originals[i], threshold, bands) for i, s in planted]))
               for share, planted in mixed.items()}
    results[threshold] = {'recall': recall, 'false': false, 'flagged': flagged, **common}
  return results


def quickstart_losses(shingle_size: int, num_perm: int, thresholds: list[float]) -> dict:
  """threshold -> (files dropped as near duplicates, files after exact dedup, their names) when the
  quickstart corpus (the stdlib) is cleaned and deduplicated by jaxgpt's own Cleaner and Deduplicator."""
  from configs import quickstart  # noqa: PLC0415
  from jaxgpt.data.clean import Cleaner  # noqa: PLC0415
  data_cfg = quickstart.get_config().data
  data_cfg.clean.shingle_size, data_cfg.clean.num_perm = shingle_size, num_perm
  outcomes = [o for o in map(Cleaner(data_cfg), sources.open_source(data_cfg).records()) if not o.dropped]
  stdlib = sysconfig.get_paths()['stdlib']
  losses = {}
  for threshold in thresholds:
    data_cfg.clean.near_dedup_threshold = threshold
    deduplicator = dedup.Deduplicator(data_cfg.clean)
    exact = sum(deduplicator.exact_original(order, o) is not None for order, o in enumerate(outcomes))
    dropped = [f'{os.path.relpath(outcomes[order].record.where, stdlib)} ~ {os.path.relpath(kept, stdlib)}'
               for order, kept in sorted(deduplicator.near_originals().items())]
    losses[threshold] = (len(dropped), len(outcomes) - exact, dropped)
  return losses


def main():
  defaults = base_config().data.clean
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shingle_sizes', type=_ints, default=[2, 3, 4, 5], help='comma-separated')
  parser.add_argument('--thresholds', type=_floats, default=[0.5, 0.6, 0.7, 0.8], help='comma-separated')
  parser.add_argument('--num_perms', type=_ints, default=[128], help='comma-separated')
  parser.add_argument('--rates', type=_floats, default=[0.01, 0.02, 0.03, 0.04, 0.05],
                      help='fractions of words edited in a copy, comma-separated')
  parser.add_argument('--shared', type=_floats, default=[0.5, 0.7, 0.8],
                      help='shares of a document another one starts with (the rest differs), comma-separated')
  parser.add_argument('--docs', type=int, default=400, help='distinct documents drawn from each genre')
  parser.add_argument('--copies', type=int, default=3, help='planted copies of each document per edit rate')
  parser.add_argument('--min_words', type=int, default=1000, help='words per document, at least')
  parser.add_argument('--genres', default='prose,code', help="'prose' (Vim's help), 'code' (the stdlib)")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--examples', type=int, default=3, help='false positives named per setting')
  parser.add_argument('--quickstart', action='store_true',
                      help='also count the quickstart corpus files dropped as near duplicates per setting')
  args = parser.parse_args()

  rng = random.Random(args.seed)
  genres = [Genre(name, args, rng) for name in args.genres.split(',')]
  header = ['shingle', 'perm', 'threshold', *(f'recall {r:.0%}' for r in args.rates), 'false positives',
            *(f'{s:.0%} shared' for s in args.shared),
            *(f'J {r:.0%}' for r in args.rates), 'max J']
  print(f'defaults now: shingle_size={defaults.shingle_size}, near_dedup_threshold={defaults.near_dedup_threshold}, '
        f'num_perm={defaults.num_perm}\n')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  examples = []
  for num_perm in args.num_perms:
    for shingle_size in args.shingle_sizes:
      start = time.time()
      per_genre = [measure(g, shingle_size, num_perm, args.thresholds) for g in genres]
      losses = quickstart_losses(shingle_size, num_perm, args.thresholds) if args.quickstart else {}
      for threshold in args.thresholds:
        results = [r[threshold] for r in per_genre]
        recall = [np.mean([r['recall'][rate] for r in results]) for rate in args.rates]
        false = [f for r in results for f in r['false']]
        flagged = [np.mean([r['flagged'][share] for r in results]) for share in args.shared]
        copy_j = [np.mean([r['copy_j'][rate] for r in results]) for rate in args.rates]
        max_j = ' / '.join(f'{r["max_j"]:.2f}' for r in results)
        false_count = ' + '.join(str(len(r['false'])) for r in results)
        cells = [str(shingle_size), str(num_perm), f'{threshold:g}', *(f'{x:.0%}' for x in recall), false_count,
                 *(f'{x:.0%}' for x in flagged), *(f'{x:.2f}' for x in copy_j), max_j]
        print('| ' + ' | '.join(cells) + ' |', flush=True)
        examples += [f'shingle {shingle_size}, perm {num_perm}, threshold {threshold:g}: {a} ~ {b}'
                     for a, b in false[:args.examples]]
        if threshold in losses:
          lost, total, names = losses[threshold]
          examples.append(f'shingle {shingle_size}, perm {num_perm}, threshold {threshold:g}: quickstart corpus '
                          f'loses {lost} of {total} files as near duplicates'
                          + (f', e.g. {"; ".join(names[:args.examples])}' if names else ''))
      print(f'  ({time.time() - start:.0f}s)', file=sys.stderr)
  genre_names = ' / '.join(g.name for g in genres)
  print(f'\nrecall and shared: mean over {genre_names}; false positives and max J: {genre_names}, of '
        f'{" + ".join(str(len(g.docs)) for g in genres)} distinct documents.')
  if examples:
    print('\n' + '\n'.join(examples))


if __name__ == '__main__':
  main()
