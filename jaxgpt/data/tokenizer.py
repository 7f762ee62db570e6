"""The tokenizer interface used everywhere: SentencePiece, a Hugging Face tokenizer.json, or tiktoken.

`Tokenizer` is what the rest of the code sees: encode, decode, vocab_size,
bos_id/eos_id (and how they are spelled), a `fingerprint` of the exact model,
save/load to one file, and `to_hugging_face`: the same tokenizer as a
`tokenizers.Tokenizer`, which Hugging Face export writes as tokenizer.json.
Three kinds sit behind it (data.tokenizer.kind):

- 'sentencepiece' (BPE or unigram), trained here on the cleaned train split to
  round-trip text exactly (decode(encode(x)) == x), which code needs:
  SentencePiece's defaults would normalise Unicode and collapse runs of spaces,
  destroying indentation. Or an existing model (Llama 2's `tokenizer.model`),
  loaded as it is.
- 'byte_bpe': a Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, Llama 3's,
  or any other model type) or GPT-2's `vocab.json` + `merges.txt`, read with the
  `tokenizers` library, so a base model is fine-tuned on data tokenized its own way.
- 'tiktoken': a `.tiktoken` file (OpenAI's encodings, or any in that format),
  read locally, never downloaded, and encoded by the `tiktoken` library.

The saved file is the model itself (a SentencePiece proto, or JSON for the other
two); `load` tells the kinds apart by content, so a run directory keeps one
`tokenizer.model` whatever the kind.
"""

import base64
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from jaxgpt import paths
from jaxgpt.config import JaxgptError, require_extra

KINDS = ('sentencepiece', 'byte_bpe', 'tiktoken')
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
  vocab_size: int
  bos_id: int
  eos_id: int
  bos_token: str  # how BOS and EOS are spelled, e.g. '<s>' and '</s>'
  eos_token: str

  def __init__(self, serialized: bytes):
    self.serialized = serialized
    self.fingerprint = hashlib.sha256(serialized).hexdigest()[:16]

  @staticmethod
  def from_bytes(serialized: bytes) -> 'Tokenizer':
    if serialized[:1] != b'{':  # a SentencePiece proto is binary; the other kinds are saved as JSON
      return SentencePieceTokenizer(serialized)
    # (Only the top level can hold these bytes unescaped: inside a JSON string a quote is \".)
    return TiktokenTokenizer(serialized) if b'"kind": "tiktoken"' in serialized else ByteLevelBPETokenizer(serialized)

  @staticmethod
  def load(path) -> 'Tokenizer':
    try:
      return Tokenizer.from_bytes(paths.path(path).read_bytes())
    except Exception as e:  # OSError, or whatever the library raises for a malformed model
      raise JaxgptError(f'cannot load the tokenizer at {path}: {e}') from None

  def save(self, path) -> None:
    paths.path(path).write_bytes(self.serialized)

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

  def to_hugging_face(self) -> tokenizers.Tokenizer:
    """This tokenizer as a Hugging Face `tokenizers.Tokenizer` (what tokenizer.json holds): it encodes every
    text to the same ids, special tokens included."""
    raise NotImplementedError


def from_config(tok_cfg) -> Tokenizer | None:
  """The tokenizer data.tokenizer names, read from its file; None for a SentencePiece model to train on the data."""
  if tok_cfg.kind == 'tiktoken':
    return load_tiktoken(tok_cfg.path, tok_cfg.pattern, tok_cfg.eos_token, tok_cfg.bos_token, tok_cfg.special_tokens)
  if tok_cfg.kind == 'byte_bpe':
    return load_byte_level_bpe(tok_cfg.path, tok_cfg.eos_token, tok_cfg.bos_token)
  return load_sentencepiece(tok_cfg.path, tok_cfg.special_tokens) if tok_cfg.path else None


# --- SentencePiece ---------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    super().__init__(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
    self.bos_token, self.eos_token = (self._sp.id_to_piece(i) if i >= 0 else '' for i in (self.bos_id, self.eos_id))

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=0)  # 0 = all cores

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    sp = self._sp
    return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                     else len(sp.id_to_piece(i).replace(_SPACE_PIECE, ' ').encode('utf-8'))
                     for i in range(self.vocab_size)], np.int32)

  def to_hugging_face(self) -> tokenizers.Tokenizer:
    """Follows the model's own settings, as transformers' SpmConverter does: BPE merges ranked by the joined
    piece's score (SentencePiece merges the pair that makes the best-scoring piece), user-defined pieces whole.
    One difference is Hugging Face's way: a control piece written in the text ('</s>') is read as that token."""
    model = _SentencePieceModel.FromString(self.serialized)
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    vocab = [(p.piece, p.score) for p in model.pieces]
    if trainer.treat_whitespace_as_suffix or trainer.model_type not in (_SP_UNIGRAM, _SP_BPE):
      raise JaxgptError('this SentencePiece model (a char or word model, or whitespace as a suffix) has no '
                        'Hugging Face tokenizer.json form: export needs a BPE or unigram model.')
    if trainer.model_type == _SP_BPE:
      normal = {p.piece: (-p.score, i) for i, p in enumerate(model.pieces) if p.type == _SP_NORMAL}
      merges = sorted((normal[piece], piece[:k], piece[k:]) for piece in normal for k in range(1, len(piece))
                      if piece[:k] in normal and piece[k:] in normal)
      hf = tokenizers.Tokenizer(models.BPE(
          {piece: i for i, (piece, _) in enumerate(vocab)}, [(left, right) for _, left, right in merges],
          unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback))
    else:
      hf = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=self.unk_id, byte_fallback=trainer.byte_fallback))
    charsmap = normalizer.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if normalizer.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines alone
      steps += [normalizers.Replace(Regex(r'\A +| +\z'), ''), normalizers.Replace(Regex(' {2,}'), ' ')]
    space = _SPACE_PIECE if normalizer.escape_whitespaces else ' '
    steps.append(normalizers.Replace(' ', space))
    decoding = [decoders.Replace(space, ' '), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
      # SentencePiece puts it before the text; Hugging Face normalizes each stretch between user-defined pieces
      # apart, so a model with both (not one trained here) gets one more after each such piece.
      steps.append(normalizers.Prepend(space))
      decoding.append(decoders.Strip(' ', 1, 0))
    hf.normalizer = normalizers.Sequence(steps)
    hf.decoder = decoders.Sequence(decoding)
    # SentencePiece finds user-defined pieces anywhere in the text; control pieces (BOS, EOS) are special.
    hf.add_tokens([AddedToken(p.piece, normalized=False) for p in model.pieces if p.type == _SP_USER_DEFINED])
    hf.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in model.pieces
                           if p.type in (_SP_CONTROL, _SP_UNKNOWN)])
    return hf


# SentencePiece's ModelProto (sentencepiece_model.proto): the fields export reads, as (name, number, type,
# default) or (name, number, message). sentencepiece's own sentencepiece_model_pb2 needs a newer protobuf
# runtime than Apache Beam allows, so the message is declared here and parsed with protobuf.
_F = descriptor_pb2.FieldDescriptorProto
_SP_MESSAGES = {
    'ModelProto': [('pieces', 1, 'SentencePiece'), ('trainer_spec', 2, 'TrainerSpec'),
                   ('normalizer_spec', 3, 'NormalizerSpec')],
    'SentencePiece': [('piece', 1, _F.TYPE_STRING, ''), ('score', 2, _F.TYPE_FLOAT, '0'),
                      ('type', 3, _F.TYPE_INT32, '1')],
    'TrainerSpec': [('model_type', 3, _F.TYPE_INT32, '1'),
                    ('treat_whitespace_as_suffix', 24, _F.TYPE_BOOL, 'false'),
                    ('byte_fallback', 35, _F.TYPE_BOOL, 'false'), ('unk_piece', 45, _F.TYPE_STRING, '<unk>')],
    'NormalizerSpec': [('precompiled_charsmap', 2, _F.TYPE_BYTES, ''),
                       ('add_dummy_prefix', 3, _F.TYPE_BOOL, 'true'),
                       ('remove_extra_whitespaces', 4, _F.TYPE_BOOL, 'true'),
                       ('escape_whitespaces', 5, _F.TYPE_BOOL, 'true')],
}
_SP_UNIGRAM, _SP_BPE = 1, 2  # TrainerSpec.ModelType
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4  # SentencePiece.Type


def _sentencepiece_model_class():
  file = descriptor_pb2.FileDescriptorProto(name='jaxgpt/sentencepiece_model.proto', package='jaxgpt_sp',
                                            syntax='proto2')
  for name, fields in _SP_MESSAGES.items():
    message = file.message_type.add(name=name)
    for field_name, number, kind, *default in fields:
      field = message.field.add(name=field_name, number=number,
                                label=_F.LABEL_REPEATED if field_name == 'pieces' else _F.LABEL_OPTIONAL)
      if isinstance(kind, str):  # a message
        field.type, field.type_name = _F.TYPE_MESSAGE, f'.jaxgpt_sp.{kind}'
      else:
        field.type, field.default_value = kind, default[0]
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('jaxgpt_sp.ModelProto'))


_SentencePieceModel = _sentencepiece_model_class()


def load_sentencepiece(path: str, special_tokens: Sequence[str] = ()) -> SentencePieceTokenizer:
  """An existing SentencePiece model (e.g. Llama 2's tokenizer.model), used as it is."""
  path = paths.expand(path)
  try:
    tokenizer = SentencePieceTokenizer(paths.path(path).read_bytes())
  except Exception as e:  # OSError, or sentencepiece's error for a file that is not a model
    raise JaxgptError(f'cannot load a SentencePiece model from data.tokenizer.path={path!r} ({e}). Point it at a '
                      'tokenizer.model file, or leave data.tokenizer.path empty to train one on the data.') from None
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise JaxgptError(f'the SentencePiece model at {path} has no BOS or EOS piece (bos_id={tokenizer.bos_id}, '
                      f'eos_id={tokenizer.eos_id}); jaxgpt frames every document with both.')
  _check_special_tokens(tokenizer, special_tokens, path)
  return tokenizer


def _check_special_tokens(tokenizer: Tokenizer, special_tokens: Sequence[str], path: str) -> None:
  split = [t for t in special_tokens if len(tokenizer.encode(t)) != 1]
  if split:
    raise JaxgptError(f'data.tokenizer.special_tokens {split} are not single tokens of the tokenizer at {path}, '
                      'which cannot gain tokens: use markers it has, or leave data.tokenizer.special_tokens empty.')


# --- a Hugging Face tokenizer.json ---------------------------------------------------------------

class ByteLevelBPETokenizer(Tokenizer):
  """A Hugging Face tokenizer.json: GPT-2 style (bytes mapped to printable characters, then BPE; no unknown
  tokens), Llama 3's, or any other model type.

  GPT-2 frames documents with one token, '<|endoftext|>', as both BOS and EOS; Llama 3 begins them with
  '<|begin_of_text|>'. The saved form is a small JSON object: those tokens and the tokenizer.json text.
  """
  kind = 'byte_bpe'
  unk_id = None

  def __init__(self, serialized: bytes):
    super().__init__(serialized)
    saved = json.loads(serialized)
    self.tokenizer_json, self.eos_token = saved['tokenizer_json'], saved['eos_token']
    self.bos_token = saved.get('bos_token', self.eos_token)
    self._tok = tokenizers.Tokenizer.from_str(self.tokenizer_json)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id = self._tok.token_to_id(self.bos_token), self._tok.token_to_id(self.eos_token)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    saved = json.loads(self.tokenizer_json)
    special = {t['id'] for t in saved.get('added_tokens', []) if t.get('special')} | {self.bos_id, self.eos_id}
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

  def to_hugging_face(self) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(self.tokenizer_json)


def load_byte_level_bpe(path: str, eos_token: str, bos_token: str = '') -> ByteLevelBPETokenizer:
  """A tokenizer from a tokenizer.json file, or a directory with GPT-2's vocab.json + merges.txt.

  `eos_token` ends every document; `bos_token` begins it ('' = `eos_token`, as GPT-2 does).
  """
  path = paths.expand(path)
  location = paths.path(path)
  try:
    if location.is_dir():  # (BPE reads local files only: a bucket's are copied first)
      with paths.local_copy(location / 'vocab.json') as vocab, paths.local_copy(location / 'merges.txt') as merges:
        tok = tokenizers.Tokenizer(models.BPE.from_file(vocab, merges))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
    else:
      tok = tokenizers.Tokenizer.from_str(location.read_text())
  except Exception as e:  # tokenizers raises plain Exceptions for missing or malformed files
    raise JaxgptError(f'cannot load a byte-level BPE tokenizer from data.tokenizer.path={path!r} ({e}). '
                      'Point it at a tokenizer.json, or a directory with vocab.json and merges.txt.') from None
  for field, token in (('eos_token', eos_token), ('bos_token', bos_token)):
    if token and tok.token_to_id(token) is None:
      raise JaxgptError(f'the tokenizer at {path} has no token {token!r} to {field[:3]} documents with; '
                        f'set data.tokenizer.{field} to one of its tokens.')
  tok.add_special_tokens([eos_token, bos_token or eos_token])  # vocab.json lists them as plain tokens: never split
  saved = {'eos_token': eos_token, 'tokenizer_json': tok.to_str()}
  if bos_token and bos_token != eos_token:  # (only then: the saved form of a GPT-2 tokenizer stays as it was)
    saved['bos_token'] = bos_token
  return ByteLevelBPETokenizer(json.dumps(saved, sort_keys=True).encode('utf-8'))


# --- tiktoken ------------------------------------------------------------------------------------

# OpenAI's encodings (tiktoken_ext/openai_public.py), for a .tiktoken file named after one: the pattern that
# splits text before BPE, and the special tokens' ids. Held here because tiktoken builds them only around a
# download; tests/test_tokenizer.py checks them against tiktoken's.
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
OPENAI_ENCODINGS = {
    'r50k_base': (_R50K_PATTERN, {'<|endoftext|>': 50256}),
    'p50k_base': (_R50K_PATTERN, {'<|endoftext|>': 50256}),
    'cl100k_base': (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
                    {'<|endoftext|>': 100257, '<|fim_prefix|>': 100258, '<|fim_middle|>': 100259,
                     '<|fim_suffix|>': 100260, '<|endofprompt|>': 100276}),
    'o200k_base': ('|'.join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""]),
        {'<|endoftext|>': 199999, '<|endofprompt|>': 200018}),
}


class TiktokenTokenizer(Tokenizer):
  """tiktoken's byte-level BPE: mergeable ranks (the .tiktoken file), the split pattern and special tokens.

  Special tokens in the text are encoded as themselves (as the other kinds' special tokens are), so chat
  markers work. The saved form is JSON: the .tiktoken file's text, the pattern, the special tokens' ids,
  BOS and EOS.
  """
  kind = 'tiktoken'
  unk_id = None

  def __init__(self, serialized: bytes):
    super().__init__(serialized)
    require_extra('tiktoken', 'tiktoken')
    import tiktoken
    saved = json.loads(serialized)
    self.ranks, self.pattern, self.special_tokens = _ranks(saved['ranks']), saved['pattern'], saved['special_tokens']
    self._enc = tiktoken.Encoding(saved['name'], pat_str=self.pattern, mergeable_ranks=self.ranks,
                                  special_tokens=self.special_tokens)
    self.vocab_size = self._enc.n_vocab
    self.bos_token, self.eos_token = saved['bos_token'], saved['eos_token']
    self.bos_id, self.eos_id = self.special_tokens[self.bos_token], self.special_tokens[self.eos_token]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._enc.encode_batch(texts, num_threads=os.cpu_count() or 1, allowed_special='all')

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    sizes = np.zeros(self.vocab_size, np.int32)
    for token, rank in self.ranks.items():
      sizes[rank] = len(token)
    return sizes

  def to_hugging_face(self) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer.json in the form Llama 3's has (split pattern, then bytes as GPT-2 spells
    them): tiktoken merges the adjacent pair that makes the lowest-ranked token, so every split of a token into
    two tokens is a merge ranked by that token; a pre-token that is a whole token is taken as it is
    (ignore_merges), as tiktoken does."""
    chars = _byte_chars()
    spell = lambda token: ''.join(chars[b] for b in token)
    merges = sorted((rank, self.ranks[token[:k]], spell(token[:k]), spell(token[k:]))
                    for token, rank in self.ranks.items() for k in range(1, len(token))
                    if token[:k] in self.ranks and token[k:] in self.ranks)
    vocab = {spell(token): rank for token, rank in self.ranks.items()} | self.special_tokens
    hf = tokenizers.Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(self.pattern), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in self.special_tokens])
    return hf


def _ranks(text: str) -> dict[bytes, int]:
  """A .tiktoken file's mergeable ranks: one base64 token and its rank per line (tiktoken.load's format)."""
  return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def _byte_chars() -> list[str]:
  """GPT-2's printable character for each byte: the alphabet of tokenizers' ByteLevel."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  others = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def load_tiktoken(path: str, pattern: str, eos_token: str, bos_token: str = '',
                  special_tokens: Sequence[str] = ()) -> TiktokenTokenizer:
  """A tiktoken encoding from a local .tiktoken file.

  A file named after one of OpenAI's encodings (cl100k_base.tiktoken, ...) brings that encoding's pattern and
  special tokens; otherwise `pattern` is the split regex, or the name of the encoding whose regex to use.
  `eos_token`, `bos_token` ('' = `eos_token`) and `special_tokens` that the encoding lacks get the next ids.
  """
  require_extra('tiktoken', 'tiktoken')
  path = paths.expand(path)
  name = os.path.basename(path).removesuffix('.tiktoken')
  own_pattern, special = OPENAI_ENCODINGS.get(name, ('', {}))
  pattern = OPENAI_ENCODINGS[pattern][0] if pattern in OPENAI_ENCODINGS else pattern or own_pattern
  if not pattern:
    raise JaxgptError(f'{path} is not named after one of OpenAI\'s encodings ({", ".join(OPENAI_ENCODINGS)}), so '
                      'its split pattern is not known: set data.tokenizer.pattern to the regex it was made with, '
                      "or to an encoding's name to use that one's (e.g. 'cl100k_base').")
  try:
    text = paths.path(path).read_text()
    ranks = _ranks(text)
  except Exception as e:  # OSError, or a line that is not 'base64 rank'
    raise JaxgptError(f'cannot load a tiktoken file from data.tokenizer.path={path!r} ({e}). Point it at a '
                      '.tiktoken file: one base64 token and its rank per line.') from None
  special = dict(special)
  for token in dict.fromkeys([eos_token, bos_token or eos_token, *special_tokens]):  # in order, once each
    special.setdefault(token, max([*ranks.values(), *special.values()]) + 1)
  saved = {'kind': 'tiktoken', 'name': name, 'ranks': text, 'pattern': pattern, 'special_tokens': special,
           'eos_token': eos_token, 'bos_token': bos_token or eos_token}
  try:
    return TiktokenTokenizer(json.dumps(saved, sort_keys=True).encode('utf-8'))
  except ValueError as e:  # tiktoken's rejection of a bad pattern or overlapping ids
    raise JaxgptError(f'tiktoken refuses the encoding in {path} with data.tokenizer.pattern={pattern!r}: {e}') from None


# --- training SentencePiece -----------------------------------------------------------------------

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
