"""Every tokenizer kind behind one interface: exact round trips on real text, save/load, errors, and the
Hugging Face form each exports as encoding every text to the same ids."""

import base64
import io
import os
import sysconfig

import pytest
import sentencepiece as spm
import tokenizers

from jaxgpt.config import JaxgptError, base_config
from jaxgpt.data import builder
from jaxgpt.data.tokenizer import (OPENAI_ENCODINGS, Tokenizer, from_config, load_byte_level_bpe, load_tiktoken,
                                   train_tokenizer)

STDLIB = sysconfig.get_paths()['stdlib']
TRAIN_FILES = ['textwrap.py', 'string.py', 'json/decoder.py']
HELD_OUT = 'shlex.py'
WEIRD = 'x = "naïve — ☃ 日本語"\n\tif  y:\n\t\treturn   1\r\n\x00'  # characters never seen in training


def read(name):
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
  tok.train_from_iterator([read(f) for f in TRAIN_FILES], trainer)
  return tok


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_sentencepiece_round_trips_unseen_code_and_keeps_special_tokens_whole(model_type, tmp_path):
  tokenizer = train_tokenizer([read(f) for f in TRAIN_FILES], vocab_size=600, model_type=model_type,
                              special_tokens=['<|user|>', '<|assistant|>'])
  held_out = read(HELD_OUT)
  for text in (held_out, WEIRD):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len(tokenizer.encode(held_out)) < len(held_out.encode()) / 2
  chat = '<|user|>\nhi\n<|assistant|>\nhello'
  ids = tokenizer.encode(chat)
  assert tokenizer.decode(ids) == chat
  assert [tokenizer.decode([i]) for i in ids].count('<|user|>') == 1
  _same_ids_in_hugging_face_form(tokenizer, [held_out, WEIRD, chat, '  two leading spaces', 'a  b   c '])
  # That tokenizer.json (a unigram or BPE model with byte fallback, no byte-level alphabet) is a 'byte_bpe'
  # tokenizer like any other: the same ids, and its bytes per token still add up.
  tokenizer.to_hugging_face().save(str(tmp_path / 'tokenizer.json'))
  as_json = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), tokenizer.eos_token, tokenizer.bos_token)
  assert (as_json.bos_id, as_json.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
  assert as_json.encode(held_out) == tokenizer.encode(held_out)
  sizes = as_json.token_bytes()
  assert sum(sizes[i] for i in as_json.encode(WEIRD)) == len(WEIRD.encode())


def _same_ids_in_hugging_face_form(tokenizer, texts):
  """What export writes as tokenizer.json encodes as the run did (BPE merges, byte fallback, special tokens)."""
  hf = tokenizer.to_hugging_face()
  for text in texts:
    assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), text[:40]
  assert (hf.token_to_id(tokenizer.bos_token), hf.token_to_id(tokenizer.eos_token)) == (tokenizer.bos_id,
                                                                                         tokenizer.eos_id)


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
  held_out = read(HELD_OUT)
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
  tokenizer = train_tokenizer([read(f) for f in TRAIN_FILES], vocab_size=500)
  tokenizer.save(str(tmp_path / 'tokenizer.model'))
  loaded = Tokenizer.load(str(tmp_path / 'tokenizer.model'))
  assert loaded.kind == 'sentencepiece' and loaded.fingerprint == tokenizer.fingerprint
  held_out = read(HELD_OUT)
  assert loaded.encode(held_out) == tokenizer.encode(held_out)
  # The fingerprint tells models apart (the data cache is keyed on it): one trained on other text differs.
  other = train_tokenizer([read(f) for f in TRAIN_FILES[:2]] + [held_out], vocab_size=500)
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
    tokenizer = train_tokenizer([read(f) for f in TRAIN_FILES], vocab_size=600, special_tokens=['<|user|>'])
  else:
    _byte_level_bpe().save(str(tmp_path / 'tokenizer.json'))
    tokenizer = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|endoftext|>')
  sizes = tokenizer.token_bytes()
  assert sizes.shape == (tokenizer.vocab_size,)
  assert sizes[tokenizer.bos_id] == 0 and sizes[tokenizer.eos_id] == 0
  for text in (read(HELD_OUT), WEIRD, ' leading space', '<|user|>\nhi'):
    assert sum(sizes[i] for i in tokenizer.encode(text)) == len(text.encode('utf-8')), text[:40]
  # Pieces tokenized apart (an instruction's prompt and its response) join without an invented space.
  prompt, response = 'Name a colour.\n', 'Blue and green.'
  joined = tokenizer.decode(tokenizer.encode(prompt) + tokenizer.encode(response))
  assert joined == prompt + response


def _llama2_style_sentencepiece(path) -> str:
  """A model as Llama 2 ships one (tokenizer.model): a space before the text, no normalisation, byte fallback."""
  model = io.BytesIO()
  lines = [line for f in TRAIN_FILES for line in read(f).splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type='bpe',
                                 byte_fallback=True, normalization_rule_name='identity',
                                 remove_extra_whitespaces=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return str(path)


def tiktoken_file(path) -> str:
  """A small .tiktoken file (base64 token, rank per line): the 256 bytes and the merges of a byte-level BPE."""
  trained = _byte_level_bpe()
  spelled = _gpt2_bytes()
  tokens = sorted((i, t) for t, i in trained.get_vocab().items() if t != '<|endoftext|>')
  path.write_text(''.join(f'{base64.b64encode(bytes(spelled[c] for c in t)).decode()} {rank}\n'
                          for rank, (_, t) in enumerate(tokens)))
  return str(path)


def _gpt2_bytes() -> dict:
  """GPT-2's printable spelling of the bytes (as in its encoder.json), character -> byte."""
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = iter(range(256, 512))
  return {chr(b) if b in printable else chr(next(others)): b for b in range(256)}


def _tokenizer_config(**fields):
  tok_cfg = base_config().data.tokenizer
  tok_cfg.update(fields)
  return tok_cfg


def test_tiktoken_file_encodes_as_tiktoken_itself_and_as_its_hugging_face_form(tmp_path, monkeypatch):
  tiktoken = pytest.importorskip('tiktoken')
  load_bpe = pytest.importorskip('tiktoken.load').load_tiktoken_bpe
  path = tiktoken_file(tmp_path / 'tiny.tiktoken')
  tokenizer = from_config(_tokenizer_config(kind='tiktoken', path=path, pattern='cl100k_base',
                                            special_tokens=('<|user|>',)))
  # The reference: tiktoken's own reader and encoder on the same file, the specials numbered after the ranks.
  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')  # read the file itself, not a cached copy
  ranks = load_bpe(path)
  assert len(ranks) == tokenizer.vocab_size - 2 == 600 - 1
  reference = tiktoken.Encoding('tiny', pat_str=OPENAI_ENCODINGS['cl100k_base'][0], mergeable_ranks=ranks,
                                special_tokens={'<|endoftext|>': 599, '<|user|>': 600})
  held_out, chat = read(HELD_OUT), '<|user|>\nName a colour.<|endoftext|>'
  for text in (held_out, WEIRD, chat):
    assert tokenizer.encode(text) == reference.encode(text, allowed_special='all')
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len(tokenizer.encode(held_out)) < len(held_out.encode()) / 2  # the merges are used
  assert tokenizer.bos_id == tokenizer.eos_id == 599 and tokenizer.kind == 'tiktoken'
  sizes = tokenizer.token_bytes()
  assert sum(sizes[i] for i in tokenizer.encode(held_out)) == len(held_out.encode()) and sizes[600] == 0
  _same_ids_in_hugging_face_form(tokenizer, [held_out, WEIRD, chat, '  two leading spaces', "it's 12345"])

  tokenizer.save(tmp_path / 'tokenizer.model')
  loaded = Tokenizer.load(tmp_path / 'tokenizer.model')
  assert loaded.kind == 'tiktoken' and loaded.fingerprint == tokenizer.fingerprint
  assert loaded.encode(chat) == tokenizer.encode(chat)

  # A file named after an OpenAI encoding brings its pattern and special tokens.
  named = load_tiktoken(tiktoken_file(tmp_path / 'cl100k_base.tiktoken'), '', '<|endoftext|>')
  assert named.eos_id == 100257 and named.encode('<|endofprompt|>') == [100276]
  assert named.encode(held_out) == tokenizer.encode(held_out)
  with pytest.raises(JaxgptError, match='data.tokenizer.pattern'):
    load_tiktoken(path, '', '<|endoftext|>')
  (tmp_path / 'bad.tiktoken').write_text('not base64 at all\n')
  with pytest.raises(JaxgptError, match='cannot load a tiktoken file'):
    load_tiktoken(str(tmp_path / 'bad.tiktoken'), 'cl100k_base', '<|endoftext|>')


def test_openai_encodings_are_tiktokens_own(monkeypatch):
  """The patterns and special tokens held for files named after OpenAI's encodings are tiktoken's, which
  builds them only around a download (stopped here: only the ranks would be downloaded)."""
  pytest.importorskip('tiktoken')
  from tiktoken_ext import openai_public
  monkeypatch.setattr(openai_public, 'load_tiktoken_bpe', lambda *args, **kwargs: {})
  for name, (pattern, special) in OPENAI_ENCODINGS.items():
    encoding = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert (encoding['pat_str'], encoding['special_tokens']) == (pattern, special), name


@pytest.mark.parametrize('kind', ['sentencepiece', 'tiktoken'])
def test_a_run_tokenizes_with_a_given_model_exactly_as_its_library_does(kind, tmp_path):
  """An existing SentencePiece model (Llama 2 style) or a .tiktoken file named in data.tokenizer is what
  prepared data is tokenized with: every document's tokens are BOS, the library's own encoding, EOS."""
  tiktoken = pytest.importorskip('tiktoken')
  load_bpe = pytest.importorskip('tiktoken.load').load_tiktoken_bpe
  (tmp_path / 'text').mkdir()
  documents = {name: read(name) for name in ('shlex.py', 'textwrap.py', 'string.py', 'bisect.py', 'heapq.py')}
  for i, text in enumerate(documents.values()):
    (tmp_path / 'text' / f'{i}.txt').write_text(text)
  data_cfg = base_config().data
  data_cfg.update(source='dir', path=str(tmp_path / 'text'), cache_dir=str(tmp_path / 'cache'), num_workers=1,
                  val_fraction=0.3)
  if kind == 'sentencepiece':
    path = _llama2_style_sentencepiece(tmp_path / 'tokenizer.model')
    library = spm.SentencePieceProcessor(model_file=path)
    encode, bos, eos = library.encode, library.bos_id(), library.eos_id()
  else:
    path = tiktoken_file(tmp_path / 'tiny.tiktoken')
    library = tiktoken.Encoding('tiny', pat_str=OPENAI_ENCODINGS['r50k_base'][0],
                                mergeable_ranks=load_bpe(path), special_tokens={'<|eot|>': 599})
    encode, bos, eos = library.encode, 599, 599
    data_cfg.tokenizer.update(pattern='r50k_base', eos_token='<|eot|>')
  data_cfg.tokenizer.update(kind=kind, path=path)
  data = builder.prepare(data_cfg, log=lambda message: None)
  assert data.tokenizer.kind == kind and data.report['tokenizer']['vocab_size'] == data.tokenizer.vocab_size
  tokenized = sorted(list(ex['tokens']) for split in ('train', 'validation') for ex in data.source(split))
  assert tokenized == sorted([bos, *encode(text), eos] for text in documents.values())
  if kind == 'sentencepiece':  # Llama 2's dummy prefix survives export too
    _same_ids_in_hugging_face_form(data.tokenizer, [documents['shlex.py'], WEIRD, ' leading space'])


def test_given_tokenizers_refuse_what_they_cannot_do(tmp_path):
  path = _llama2_style_sentencepiece(tmp_path / 'tokenizer.model')
  with pytest.raises(JaxgptError, match=r"special_tokens \['<\|user\|>'\] are not single tokens"):
    from_config(_tokenizer_config(path=path, special_tokens=('<|user|>',)))
  (tmp_path / 'garbage.model').write_bytes(b'\x00not a model')
  with pytest.raises(JaxgptError, match='cannot load a SentencePiece model'):
    from_config(_tokenizer_config(path=str(tmp_path / 'garbage.model')))
  assert from_config(_tokenizer_config()) is None  # no path: trained on the data
  _byte_level_bpe().save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(JaxgptError, match=r"no token '<\|begin_of_text\|>' to bos"):
    from_config(_tokenizer_config(kind='byte_bpe', path=str(tmp_path / 'tokenizer.json'),
                                  bos_token='<|begin_of_text|>'))


def test_a_tokenizer_json_with_its_own_bos_token(tmp_path):
  """Llama 3 begins documents with <|begin_of_text|> and ends them with <|end_of_text|>."""
  trained = _byte_level_bpe()
  trained.add_special_tokens(['<|begin_of_text|>', '<|end_of_text|>'])
  trained.save(str(tmp_path / 'tokenizer.json'))
  tokenizer = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|end_of_text|>', '<|begin_of_text|>')
  assert (tokenizer.bos_id, tokenizer.eos_id) == (trained.token_to_id('<|begin_of_text|>'),
                                                  trained.token_to_id('<|end_of_text|>'))
  assert tokenizer.token_bytes()[[tokenizer.bos_id, tokenizer.eos_id]].tolist() == [0, 0]
  loaded = Tokenizer.from_bytes(tokenizer.serialized)
  assert (loaded.bos_token, loaded.bos_id) == ('<|begin_of_text|>', tokenizer.bos_id)
  # One token for both, as GPT-2: the same saved form as before BOS could differ, so older runs keep their fingerprint.
  gpt2_style = load_byte_level_bpe(str(tmp_path / 'tokenizer.json'), '<|end_of_text|>')
  assert gpt2_style.bos_id == gpt2_style.eos_id and b'bos_token' not in gpt2_style.serialized
