"""Small randomly initialised Hugging Face models saved to disk, for the conversion and fine-tuning tests.

Nothing is downloaded: the byte-level BPE tokenizer is trained here on a few
sentences and the models are built from configs. torch and transformers are
test-only dependencies; tests that need them skip when they are absent.
"""

import json
import os

import pytest
import tokenizers

EOS = '<|endoftext|>'
_TEXT = ['the quick brown fox jumps over the lazy dog', 'reverse: abc -> cba', 'upper: dog -> DOG',
         'def f(x):\n    return x + 1\n', 'Jaxgpt fine-tunes GPT-2 and Llama models.'] * 20


def require_transformers():
  torch = pytest.importorskip('torch', reason='the Hugging Face parity tests need torch (pip install -e .[test])')
  transformers = pytest.importorskip('transformers', reason='the parity tests need transformers (pip install -e .[test])')
  torch.manual_seed(0)
  return torch, transformers


def save_tokenizer(directory: str, vocab_size: int = 320) -> int:
  """A GPT-2 style tokenizer (tokenizer.json + tokenizer_config.json); returns its vocabulary size."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TEXT, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': EOS, 'eos_token': EOS}, f)
  return tok.get_vocab_size()


def save_gpt2(directory: str, layers: int = 2, heads: int = 2, width: int = 32, positions: int = 64,
              vocab_size: int = 320, init_std: float = 0.02):
  """A random GPT2LMHeadModel with its tokenizer in `directory`; returns the model (eval mode).

  vocab_size below 258 leaves no room for merges: one token per byte. init_std is the weights' spread:
  GPT-2's 0.02 keeps activations so small that, say, the exact GELU for the tanh one moves logits by 4e-7.
  """
  _, transformers = require_transformers()
  vocab = save_tokenizer(directory, vocab_size)
  config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                                   n_head=heads, bos_token_id=0, eos_token_id=0, initializer_range=init_std)
  model = transformers.GPT2LMHeadModel(config).eval()
  _randomize_norms(model)
  model.save_pretrained(directory)
  return model


def save_llama(directory: str, layers: int = 2, heads: int = 4, kv_heads: int = 2, width: int = 32,
               tie: bool = False, init_std: float = 0.02):
  """A random LlamaForCausalLM (grouped-query attention) with its tokenizer in `directory`."""
  _, transformers = require_transformers()
  vocab = save_tokenizer(directory)
  config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5,
                                    rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                                    initializer_range=init_std)
  model = transformers.LlamaForCausalLM(config).eval()
  _randomize_norms(model)
  model.save_pretrained(directory)
  return model


def save_model(directory: str, config, vocab_padding: int = 0):
  """A random model of any transformers `config` with its tokenizer in `directory`; returns it (eval mode).

  Its vocab_size is set to the tokenizer's plus vocab_padding: embedding rows no token reaches, as GPT-J,
  Pythia and Qwen2 pad theirs. Attention is the eager implementation, which applies every mask (sliding windows).
  """
  _, transformers = require_transformers()
  config.vocab_size = save_tokenizer(directory) + vocab_padding
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager').eval()
  _randomize_norms(model)
  model.save_pretrained(directory)
  return model


def _randomize_norms(model) -> None:
  """Norm scales start at 1 and biases at 0; random values make a wrong mapping show in the logits."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or 'ln' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))


def hf_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()
