"""Both tokenizer kinds behind one interface: exact round trips on real text, save/load, errors."""

import os
import sysconfig

import pytest
import tokenizers

from jaxgpt.config import JaxgptError
from jaxgpt.data.tokenizer import Tokenizer, load_byte_level_bpe, train_tokenizer

STDLIB = sysconfig.get_paths()['stdlib']
TRAIN_FILES = ['textwrap.py', 'string.py', 'json/decoder.py']
HELD_OUT = 'shlex.py'
WEIRD = 'x = "naïve — ☃ 日本語"\n\tif  y:\n\t\treturn   1\r\n\x00'  # characters never seen in training


def _read(name):
  with open(os.path.join(STDLIB, name), encoding='utf-8') as f:
    return f.read()


def _byte_level_bpe(vocab_size=600) -> tokenizers.Tokenizer:
  """A small GPT-2 style tokenizer trained here: the format GPT-2's own files have."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([_read(f) for f in TRAIN_FILES], trainer)
  return tok


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_sentencepiece_round_trips_unseen_code_and_keeps_special_tokens_whole(model_type):
  tokenizer = train_tokenizer([_read(f) for f in TRAIN_FILES], vocab_size=600, model_type=model_type,
                              special_tokens=['<|user|>', '<|assistant|>'])
  held_out = _read(HELD_OUT)
  for text in (held_out, WEIRD):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len(tokenizer.encode(held_out)) < len(held_out.encode()) / 2
  chat = '<|user|>\nhi\n<|assistant|>\nhello'
  ids = tokenizer.encode(chat)
  assert tokenizer.decode(ids) == chat
  assert [tokenizer.decode([i]) for i in ids].count('<|user|>') == 1


@pytest.mark.parametrize('files', ['tokenizer.json', 'vocab+merges'])
def test_byte_level_bpe_from_local_files_round_trips_and_survives_save_and_load(tmp_path, files):
  trained = _byte_level_bpe()
  if files == 'tokenizer.json':
    path = str(tmp_path / 'tokenizer.json')
    trained.save(path)
  else:
    trained.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    path = str(tmp_path)
  tokenizer = load_byte_level_bpe(path, '<|endoftext|>')
  held_out = _read(HELD_OUT)
  for text in (held_out, WEIRD):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.kind == 'byte_bpe' and tokenizer.unk_id is None
  assert tokenizer.bos_id == tokenizer.eos_id == trained.token_to_id('<|endoftext|>')
  assert tokenizer.decode([tokenizer.eos_id]) == '<|endoftext|>'

  tokenizer.save(str(tmp_path / 'saved.model'))
  loaded = Tokenizer.load(str(tmp_path / 'saved.model'))
  assert type(loaded) is type(tokenizer) and loaded.fingerprint == tokenizer.fingerprint
  assert loaded.encode(held_out) == tokenizer.encode(held_out)
  assert loaded.vocab_size == tokenizer.vocab_size == trained.get_vocab_size()


def test_sentencepiece_save_and_load_keep_the_fingerprint(tmp_path):
  tokenizer = train_tokenizer([_read(f) for f in TRAIN_FILES], vocab_size=500)
  tokenizer.save(str(tmp_path / 'tokenizer.model'))
  loaded = Tokenizer.load(str(tmp_path / 'tokenizer.model'))
  assert loaded.kind == 'sentencepiece' and loaded.fingerprint == tokenizer.fingerprint
  held_out = _read(HELD_OUT)
  assert loaded.encode(held_out) == tokenizer.encode(held_out)
  # The fingerprint tells models apart (the data cache is keyed on it): one trained on other text differs.
  other = train_tokenizer([_read(f) for f in TRAIN_FILES[:2]] + [held_out], vocab_size=500)
  assert other.fingerprint != tokenizer.fingerprint


def test_byte_level_bpe_problems_are_clear_errors(tmp_path):
  with pytest.raises(JaxgptError, match='cannot load a byte-level BPE tokenizer'):
    load_byte_level_bpe(str(tmp_path / 'missing.json'), '<|endoftext|>')
  _byte_level_bpe().save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(JaxgptError, match=r"no token '<\|eot\|>'"):
    load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|eot|>')
  (tmp_path / 'garbage.model').write_bytes(b'\x00not a model')
  with pytest.raises(JaxgptError, match='cannot load the tokenizer'):
    Tokenizer.load(str(tmp_path / 'garbage.model'))


@pytest.mark.parametrize('kind', ['sentencepiece', 'byte_bpe'])
def test_token_bytes_add_up_to_the_texts_bytes_and_special_tokens_to_none(kind, tmp_path):
  """The bytes behind bits per byte: summed over a text's tokens they are its UTF-8 bytes, exactly."""
  if kind == 'sentencepiece':
    tokenizer = train_tokenizer([_read(f) for f in TRAIN_FILES], vocab_size=600, special_tokens=['<|user|>'])
  else:
    _byte_level_bpe().save(str(tmp_path / 'tokenizer.json'))
    tokenizer = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|endoftext|>')
  sizes = tokenizer.token_bytes()
  assert sizes.shape == (tokenizer.vocab_size,)
  assert sizes[tokenizer.bos_id] == 0 and sizes[tokenizer.eos_id] == 0
  for text in (_read(HELD_OUT), WEIRD, ' leading space', '<|user|>\nhi'):
    assert sum(sizes[i] for i in tokenizer.encode(text)) == len(text.encode('utf-8')), text[:40]
  # Pieces tokenized apart (an instruction's prompt and its response) join without an invented space.
  prompt, response = 'Name a colour.\n', 'Blue and green.'
  joined = tokenizer.decode(tokenizer.encode(prompt) + tokenizer.encode(response))
  assert joined == prompt + response
