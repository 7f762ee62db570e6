"""The tokenizer interface used everywhere: SentencePiece or GPT-2 byte-level BPE.

`Tokenizer` is what the rest of the code sees: encode, decode, vocab_size,
bos_id/eos_id, a `fingerprint` of the exact model, and save/load to one file.
Two kinds sit behind it:

- SentencePiece (BPE or unigram), trained here on the cleaned train split to
  round-trip text exactly (decode(encode(x)) == x), which code needs:
  SentencePiece's defaults would normalise Unicode and collapse runs of spaces,
  destroying indentation.
- GPT-2 style byte-level BPE from a local `tokenizer.json` or `vocab.json` +
  `merges.txt` (the `tokenizers` library), so a GPT-2 checkpoint can be
  fine-tuned on data tokenized its own way.

The saved file is the model itself (a SentencePiece proto, or the tokenizer.json
text); `load` tells the kinds apart by content, so a run directory keeps one
`tokenizer.model` whatever the kind.
"""

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
import tokenizers

from jaxgpt import paths
from jaxgpt.config import JaxgptError

BOS_ID, EOS_ID = 1, 2
_SPACE_PIECE = '\u2581'  # how SentencePiece (and Llama's tokenizer.json) spell a space
_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')
# Lines per training "sentence": long enough to learn multi-line pieces of code,
# short enough for SentencePiece's sentence-length limit.
_LINES_PER_CHUNK = 8
_MAX_TRAINING_CHUNKS = 200_000


class Tokenizer:
  """Encodes text to int ids and back. `fingerprint` identifies the exact model."""

  kind: str
  unk_id: int | None  # None when every byte sequence has its own ids (byte-level BPE)

  def __init__(self, serialized: bytes):
    self.serialized = serialized
    self.fingerprint = hashlib.sha256(serialized).hexdigest()[:16]

  @staticmethod
  def from_bytes(serialized: bytes) -> 'Tokenizer':
    if serialized[:1] == b'{':  # ByteLevelBPETokenizer's JSON; a SentencePiece proto is binary
      return ByteLevelBPETokenizer(serialized)
    return SentencePieceTokenizer(serialized)

  @staticmethod
  def load(path) -> 'Tokenizer':
    try:
      return Tokenizer.from_bytes(paths.path(path).read_bytes())
    except Exception as e:  # OSError, or whatever the library raises for a malformed model
      raise JaxgptError(f'cannot load the tokenizer at {path}: {e}') from None

  def save(self, path) -> None:
    paths.path(path).write_bytes(self.serialized)

  vocab_size: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: the UTF-8 bytes of text each token stands for; 0 for BOS, EOS and other
    special tokens. Summed over the predicted tokens it gives the bytes for bits per byte."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    super().__init__(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=0)  # 0 = all cores

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    sp = self._sp
    return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                     else len(sp.id_to_piece(i).replace(_SPACE_PIECE, ' ').encode('utf-8'))
                     for i in range(self.vocab_size)], np.int32)


class ByteLevelBPETokenizer(Tokenizer):
  """GPT-2 style: bytes mapped to printable characters, then BPE; no unknown tokens.

  GPT-2 frames documents with one token, '<|endoftext|>', as both BOS and EOS.
  The saved form is a small JSON object: that token and the tokenizer.json text.
  """
  kind = 'byte_bpe'
  unk_id = None

  def __init__(self, serialized: bytes):
    super().__init__(serialized)
    saved = json.loads(serialized)
    self.tokenizer_json, self.eos_token = saved['tokenizer_json'], saved['eos_token']  # for Hugging Face export
    self._tok = tokenizers.Tokenizer.from_str(self.tokenizer_json)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self.eos_id = self._tok.token_to_id(self.eos_token)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    saved = json.loads(self.tokenizer_json)
    special = {t['id'] for t in saved.get('added_tokens', []) if t.get('special')} | {self.eos_id}
    # GPT-2's byte-level alphabet spells each byte as one character; Llama-style tokenizers
    # (Metaspace + byte fallback) spell a space as '\u2581' and a raw byte as '<0xNN>'.
    byte_level = 'ByteLevel' in json.dumps(saved.get('decoder'))
    sizes = np.zeros(self.vocab_size, np.int32)
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if i in special:
        continue
      if byte_level:
        sizes[i] = len(token)
      else:
        sizes[i] = 1 if _BYTE_PIECE.fullmatch(token) else len(token.replace(_SPACE_PIECE, ' ').encode('utf-8'))
    return sizes


def load_byte_level_bpe(path: str, eos_token: str) -> ByteLevelBPETokenizer:
  """A GPT-2 style tokenizer from a tokenizer.json file, or a directory with vocab.json + merges.txt."""
  path = paths.expand(path)
  location = paths.path(path)
  try:
    if location.is_dir():  # (BPE reads local files only: a bucket's are copied first)
      with paths.local_copy(location / 'vocab.json') as vocab, paths.local_copy(location / 'merges.txt') as merges:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
      tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = tokenizers.decoders.ByteLevel()
    else:
      tok = tokenizers.Tokenizer.from_str(location.read_text())
  except Exception as e:  # tokenizers raises plain Exceptions for missing or malformed files
    raise JaxgptError(f'cannot load a byte-level BPE tokenizer from data.tokenizer.path={path!r} ({e}). '
                      'Point it at a tokenizer.json, or a directory with vocab.json and merges.txt.') from None
  if tok.token_to_id(eos_token) is None:
    raise JaxgptError(f'the tokenizer at {path} has no token {eos_token!r} to end documents with; '
                      'set data.tokenizer.eos_token to one of its tokens.')
  tok.add_special_tokens([eos_token])  # vocab.json lists it as a plain token; it must never be split
  saved = {'eos_token': eos_token, 'tokenizer_json': tok.to_str()}
  return ByteLevelBPETokenizer(json.dumps(saved, sort_keys=True).encode('utf-8'))


def _chunks(texts: Iterable[str]) -> Iterator[str]:
  count = 0
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), _LINES_PER_CHUNK):
      yield ''.join(lines[i:i + _LINES_PER_CHUNK])
      count += 1
      if count >= _MAX_TRAINING_CHUNKS:
        return


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_type: str = 'bpe',
                    special_tokens: Iterable[str] = ()) -> SentencePieceTokenizer:
  """Trains a byte-fallback SentencePiece model on `texts` (a sample of the train split).

  `special_tokens` (end-of-text, chat role markers) are kept whole: never split,
  and never merged with the text around them.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, remove_extra_whitespaces=False,
        normalization_rule_name='identity', allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=['\n', '\t', *special_tokens], max_sentence_length=16384,
        unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, character_coverage=0.9995,
        # No '\u2581' added in front of each text: pieces tokenized apart (an instruction's prompt and
        # response) then join without an invented space, and the pieces' bytes add up to the text's.
        add_dummy_prefix=False,
        num_threads=2, minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size' in str(e):
      raise JaxgptError(
          f'SentencePiece cannot build a {vocab_size}-piece vocabulary from this text ({e}). '
          'Change data.vocab_size as that message says, or add more text.') from None
    raise
  return SentencePieceTokenizer(model.getvalue())
