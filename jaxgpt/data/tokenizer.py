"""The tokenizer interface used everywhere: SentencePiece BPE, trained or loaded.

Trained to round-trip text exactly (decode(encode(x)) == x), which code needs:
SentencePiece's defaults would normalise Unicode and collapse runs of spaces,
destroying indentation.
"""

import hashlib
import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from jaxgpt.config import JaxgptError

BOS_ID, EOS_ID = 1, 2
# Lines per training "sentence": long enough to learn multi-line pieces of code,
# short enough for SentencePiece's sentence-length limit.
_LINES_PER_CHUNK = 8
_MAX_TRAINING_CHUNKS = 200_000


class Tokenizer:
  """Encodes text to int ids and back. `fingerprint` identifies the exact model."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    try:
      with open(path, 'rb') as f:
        return cls(f.read())
    except (OSError, RuntimeError) as e:
      raise JaxgptError(f'cannot load the tokenizer at {path}: {e}') from None

  def save(self, path: str) -> None:
    with open(path, 'wb') as f:
      f.write(self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=0)  # 0 = all cores

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def _chunks(texts: Iterable[str]) -> Iterator[str]:
  count = 0
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), _LINES_PER_CHUNK):
      yield ''.join(lines[i:i + _LINES_PER_CHUNK])
      count += 1
      if count >= _MAX_TRAINING_CHUNKS:
        return


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-fallback BPE model on `texts` (a sample of the train split)."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts), model_writer=model, vocab_size=vocab_size,
        model_type='bpe', byte_fallback=True, remove_extra_whitespaces=False,
        normalization_rule_name='identity', allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=['\n', '\t'], max_sentence_length=16384,
        unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, character_coverage=0.9995,
        num_threads=2, minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size' in str(e):
      raise JaxgptError(
          f'SentencePiece cannot build a {vocab_size}-piece vocabulary from this text ({e}). '
          'Change data.vocab_size as that message says, or add more text.') from None
    raise
  return Tokenizer(model.getvalue())
