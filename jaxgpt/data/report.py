"""What data preparation did, as `report.json` and as a table for people.

Every document read is counted once: kept (per split), or dropped for exactly
one reason. Kept documents are also counted per cleaning step that changed them
and per flag they raised. Each reason, step and flag keeps a few examples
naming the document (path, path:line, dataset[index]) and why.
"""

import collections
import dataclasses

_EXAMPLES = 5
SPLITS = ('train', 'validation')


@dataclasses.dataclass
class Tally:
  """Counts by reason, with the first few examples of each."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, reason: str, where: str, detail: str = '') -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES:
      self.examples[reason].append(f'{where} ({detail})' if detail else where)

  def to_dict(self) -> dict:
    return {r: {'count': n, 'examples': self.examples[r]} for r, n in sorted(self.counts.items())}

  def summary(self) -> str:
    return ', '.join(f'{n} {r} (e.g. {self.examples[r][0]})' for r, n in sorted(self.counts.items()))


@dataclasses.dataclass
class Report:
  read: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # documents, bytes
  kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped: Tally = dataclasses.field(default_factory=Tally)
  changed: Tally = dataclasses.field(default_factory=Tally)
  flagged: Tally = dataclasses.field(default_factory=Tally)
  splits: dict = dataclasses.field(default_factory=dict)  # split -> documents, bytes, tokens
  tokenizer: dict = dataclasses.field(default_factory=dict)
  speed: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    return {
        'read': dict(self.read), 'kept': dict(self.kept),
        'dropped': self.dropped.to_dict(), 'changed': self.changed.to_dict(), 'flagged': self.flagged.to_dict(),
        **{split: self.splits[split] for split in SPLITS},
        'tokenizer': self.tokenizer, 'speed': self.speed,
    }


def table(report: dict) -> str:
  """The report as aligned lines: what came in, what went out and why, tokens, tokenizer, speed."""
  rows = [('read', f'{report["read"]["documents"]:,} docs', _mb(report['read']['bytes']), '')]
  for section in ('dropped', 'changed', 'flagged'):
    for reason, entry in report[section].items():
      rows.append((f'{section}: {reason}', f'{entry["count"]:,} docs', '', f'e.g. {entry["examples"][0]}'))
  rows.append(('kept', f'{report["kept"]["documents"]:,} docs', _mb(report['kept']['bytes']), ''))
  for split in SPLITS:
    s = report[split]
    rows.append((split, f'{s["documents"]:,} docs', _mb(s['bytes']), f'{s["tokens"]:,} tokens'))
  width = max(len(r[0]) for r in rows)
  lines = ['data report:'] + [f'  {a:<{width}}  {b:>12}  {c:>9}  {d}'.rstrip() for a, b, c, d in rows]
  t = report['tokenizer']
  lines.append(f'  tokenizer: {t["kind"]}, {t["vocab_size"]:,} pieces, {t["tokens_per_byte"]:.3f} tokens/byte, '
               f'unknown-token rate {t["unknown_rate"]:.4%} (train split)')
  s = report['speed']
  lines.append(f'  speed: cleaned at {s["docs_per_s"]:,.0f} docs/s, {s["mb_per_s"]:.1f} MB/s with '
               f'{s["workers"]} worker(s); tokenized at {s["tokens_per_s"]:,.0f} tokens/s')
  return '\n'.join(lines)


def _mb(n: int) -> str:
  return f'{n / 1e6:.2f} MB'
