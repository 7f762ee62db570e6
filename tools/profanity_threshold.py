"""Precision and recall of the document-level profanity decision over a grid of thresholds.

  python tools/profanity_threshold.py CORPUS [--pools tests/data/profanity] [--classifier_threshold 0.9]

Every .txt file under CORPUS is one literary document that should be kept
(docs/data.md: 757 scenes of 37 public-domain plays). The abusive documents,
which should be caught, are built from the pools in --pools: the passages of
ordinary prose in prose.txt (alone, in pairs and all together) with a line of
abuse.txt after every k-th prose line, k = 1, 3, 7, 15, 31. For each
data.safety.flagged_line_fraction in the grid, SafetyChecker decides every
document; the table gives precision, recall (all, and per k) and the literary
documents flagged, and the literary documents flagged at the config's default
are listed with the lines that made them profane.
"""

import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxgpt.config import JaxgptError, base_config  # noqa: E402
from jaxgpt.safety import SafetyChecker  # noqa: E402

PROSE_LINES_PER_ABUSE = (1, 3, 7, 15, 31)
FRACTIONS = (0.0, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def _pool_lines(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def abusive_documents(pools: str) -> list[tuple[int, str]]:
  """(k, document) pairs: prose passages with an abusive line after every k-th prose line."""
  passages = [[]]
  for line in _pool_lines(os.path.join(pools, 'prose.txt')):
    if line.startswith('#'):  # '# topic' starts a passage
      passages.append([])
    elif line.strip():
      passages[-1].append(line)
  passages = [p for p in passages if p]
  abuse = [l for l in _pool_lines(os.path.join(pools, 'abuse.txt')) if l.strip() and not l.startswith('#')]
  hosts = passages + [passages[i] + passages[i + 1] for i in range(0, len(passages) - 1, 2)] + [sum(passages, [])]
  documents = []
  for k in PROSE_LINES_PER_ABUSE:
    for h, host in enumerate(hosts):
      if len(host) < k:
        continue  # too short to hold one abusive line per k prose lines
      lines, used = [], 0
      for i, line in enumerate(host, 1):
        lines.append(line)
        if i % k == 0:
          lines.append(abuse[(h + used) % len(abuse)])
          used += 1
      documents.append((k, '\n'.join(lines) + '\n'))
  if len(sum(passages, [])) < max(PROSE_LINES_PER_ABUSE):
    raise JaxgptError(f'{pools}/prose.txt has too few lines: give at least {max(PROSE_LINES_PER_ABUSE)}.')
  return documents


def literary_documents(corpus: str) -> list[tuple[str, str]]:
  paths = sorted(glob.glob(os.path.join(corpus, '**', '*.txt'), recursive=True))
  if not paths:
    raise JaxgptError(f'no .txt documents under {corpus!r}: give a directory of literary texts, one per file.')
  documents = []
  for path in paths:
    with open(path, encoding='utf-8') as f:
      documents.append((os.path.relpath(path, corpus), f.read()))
  return documents


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('corpus', help='directory of literary .txt documents that should be kept')
  parser.add_argument('--pools', default=os.path.join(REPO, 'tests', 'data', 'profanity'),
                      help='directory with prose.txt and abuse.txt')
  parser.add_argument('--classifier_threshold', type=float, default=base_config().data.safety.classifier_threshold)
  args = parser.parse_args()
  literature = literary_documents(args.corpus)
  abusive = abusive_documents(args.pools)
  default = base_config().data.safety.flagged_line_fraction
  print(f'{len(literature)} literary documents, {len(abusive)} abusive documents; classifier_threshold '
        f'{args.classifier_threshold}; recall per k: one abusive line after every k prose lines')
  print(f'{"fraction":>8}  {"precision":>9}  {"recall":>6}  {"literary flagged":>16}  ' +
        '  '.join(f'k={k:<3}' for k in PROSE_LINES_PER_ABUSE))
  for fraction in sorted({*FRACTIONS, default}):
    checker = SafetyChecker({'classifier_threshold': args.classifier_threshold, 'flagged_line_fraction': fraction})
    false_alarms = [(name, flags) for name, flags in ((n, checker.check(t)) for n, t in literature) if flags.profane]
    caught = [(k, checker.check(text).profane) for k, text in abusive]
    hits = sum(profane for _, profane in caught)
    precision = hits / (hits + len(false_alarms)) if hits + len(false_alarms) else 1.0
    per_k = [sum(p for kk, p in caught if kk == k) / sum(1 for kk, _ in caught if kk == k)
             for k in PROSE_LINES_PER_ABUSE]
    mark = ' (default)' if fraction == default else ''
    print(f'{fraction:>8.3f}  {precision:>9.3f}  {hits / len(caught):>6.3f}  '
          f'{len(false_alarms):>9} {len(false_alarms) / len(literature):>6.1%}  ' +
          '  '.join(f'{r:5.2f}' for r in per_k) + mark)
    if fraction == default:
      default_alarms = false_alarms
  for name, flags in default_alarms:
    print(f'flagged at the default: {name}: {flags.reason()}')


if __name__ == '__main__':
  try:
    main()
  except JaxgptError as e:
    sys.exit(f'error: {e}')
