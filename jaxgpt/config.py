"""Command-line configs: load an ml-collections file, apply overrides, validate.

Every entry point goes through `run_cli`, which turns the mistakes users make
(a missing config file, an override of a field that does not exist, a value
that cannot work) into one line on stderr and exit status 2, not a traceback.
"""

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging
import ml_collections
from ml_collections import ConfigDict, config_flags


class JaxgptError(Exception):
  """A problem the user can fix. The message names the problem and the fix."""


def base_config() -> ConfigDict:
  """Every field a run reads, with its default. Config files start here and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.seq_len = 128
  c.batch_size = 16  # global, across all devices and hosts

  # Data preparation (python -m jaxgpt.prepare, or the first training run); docs/data.md.
  c.data = ml_collections.ConfigDict()
  # 'stdlib' (the running Python's .py files), 'dir' (a directory of text files), 'jsonl' (JSON lines, also
  # .jsonl.gz/.jsonl.zst shards), 'parquet', 'arrow' (a Hugging Face save_to_disk directory), 'warc' (WARC/WET
  # web archives), 'wikipedia' (.xml.bz2 dumps) or 'tfds'; every kind but stdlib, dir and tfds needs jaxgpt[corpus].
  c.data.source = 'stdlib'
  # A directory for 'dir' and 'arrow'; for 'jsonl', 'parquet', 'warc' and 'wikipedia' files, directories (every
  # matching file under them) or globs ('shards/*.jsonl.zst', 'gs://b/c4/*.json.gz'), comma-separated; the
  # TFDS data_dir for 'tfds' ('' = default).
  c.data.path = ''
  c.data.glob = '**/*.txt'  # files taken from data.path when source='dir'; several: comma-separated
  c.data.exclude = ''  # comma-separated globs (relative to data.path) of files to leave out, e.g. 'build/**'
  c.data.text_field = 'text'  # the JSONL field (Parquet/Arrow column, TFDS feature) holding each document
  # JSONL/Parquet/Arrow: a record's id (str/int) keys its split; without one, a hash of the JSON line, or the
  # table file's name and the row number.
  c.data.id_field = 'id'
  # JSONL/Parquet/Arrow: keep only records whose numeric field filter_field lies in [filter_min, filter_max]
  # (e.g. 'score' >= 3 for forum answers); others, and those without a number there, are dropped as 'filtered'.
  c.data.filter_field = ''
  c.data.filter_min = float('-inf')
  c.data.filter_max = float('inf')
  # Language identification (py3langid, jaxgpt[corpus]): keep documents whose most likely language is one of
  # these ISO 639-1 codes, e.g. ('en',), with at least this probability; others are dropped as 'language'.
  c.data.languages = ()
  c.data.min_language_score = 0.5
  # Instruction data in JSONL: set both fields; each document is instruction_format filled with them.
  c.data.instruction_field = ''
  c.data.response_field = ''
  c.data.instruction_format = '<|user|>\n{instruction}\n<|assistant|>\n{response}'
  # Instruction tuning: 'alpaca' (instruction, optional input, output) or 'chat' (messages with roles, or ShareGPT
  # conversations) JSONL, rendered with data.template; only the responses (and their end markers) are trained on.
  # 'preference': pairs {"prompt", "chosen", "rejected"} for train.objective='dpo' (docs/finetuning.md).
  c.data.format = 'text'  # 'text' (text_field, or instruction_field + response_field), 'alpaca', 'chat', 'preference'
  c.data.template = ml_collections.ConfigDict()
  c.data.template.system = '<|system|>\n{content}\n'
  c.data.template.user = '<|user|>\n{content}\n'
  c.data.template.assistant = '<|assistant|>\n'  # opens each response; the prompt ends with it
  c.data.template.end = '<|end|>\n'  # closes each response, trained so the model learns to stop
  c.data.template.alpaca_input = '{instruction}\n\n{input}'  # an Alpaca record's user turn when it has an input
  c.data.tfds_name = ''  # source='tfds': a dataset prepared as array_record, e.g. 'my_corpus' or 'my_corpus:1.0.0'
  c.data.tfds_split = 'train'  # the TFDS split read; train/validation are then split here by hash
  c.data.max_docs = 0  # 0 = every document; a cap makes small experiments fast
  c.data.val_fraction = 0.05  # documents (files or JSONL lines) held out for validation
  c.data.on_bad_utf8 = 'skip'  # 'skip' (counted and named), 'repair' (bad bytes become U+FFFD, counted) or 'error'
  # A file that cannot be read to its end (truncated or corrupt .gz/.zst/.bz2, malformed XML, a table without the
  # text column): 'skip' keeps what came before the problem and counts the file as a 'bad shard' in the report;
  # 'error' stops with the file's name.
  c.data.on_bad_shard = 'skip'
  c.data.vocab_size = 4096  # SentencePiece vocabulary, trained on the cleaned train split
  c.data.num_workers = 0  # processes that clean documents; 0 = one per core, 1 = none (in this process)
  # 'local' (num_workers processes here) or 'beam' (an Apache Beam pipeline; same result; docs/data.md).
  c.data.executor = 'local'
  c.data.beam_args = ''  # executor='beam': pipeline options, e.g. '--runner=DirectRunner --direct_num_workers=2'
  c.data.cache_dir = '~/.cache/jaxgpt'  # tokenizer and TFDS dataset, reused across runs
  c.data.shuffle = True
  # Several sources in one run (docs/data.md, Mixtures): {name: {'weight': w, field: value, ...}}, each entry
  # overriding data.* fields for its source; weights are normalised into each source's share of the tokens
  # trained on. Empty: the one source above.
  c.data.mixture = ml_collections.ConfigDict()

  c.data.tokenizer = ml_collections.ConfigDict()
  # 'sentencepiece' (trained here, or an existing model at path), 'byte_bpe' (a Hugging Face tokenizer.json: GPT-2,
  # Llama 3, ...) or 'tiktoken' (a local .tiktoken file; jaxgpt[tiktoken]); docs/data.md.
  c.data.tokenizer.kind = 'sentencepiece'
  c.data.tokenizer.model_type = 'bpe'  # sentencepiece: 'bpe' or 'unigram'
  # sentencepiece, tiktoken: tokens never split, e.g. ('<|endoftext|>', '<|user|>', '<|assistant|>') for chat data
  # (added to the vocabulary; an existing SentencePiece model must already have them).
  c.data.tokenizer.special_tokens = ()
  # sentencepiece: a tokenizer.model to use instead of training one ('' = train); byte_bpe: a tokenizer.json, or a
  # directory with vocab.json + merges.txt; tiktoken: a .tiktoken file.
  c.data.tokenizer.path = ''
  c.data.tokenizer.eos_token = '<|endoftext|>'  # byte_bpe, tiktoken: ends every document
  c.data.tokenizer.bos_token = ''  # byte_bpe, tiktoken: begins every document ('' = eos_token, as GPT-2 does)
  # tiktoken: the regex that splits text before BPE, or the OpenAI encoding whose regex to use ('cl100k_base');
  # '' = that of the encoding the file is named after (cl100k_base.tiktoken, ...).
  c.data.tokenizer.pattern = ''

  # Cleaning, in this order; every step that changes or drops a document is counted in report.json.
  # Defaults suit the quickstart's code; configs/web_text.py shows Gopher/C4-style settings for prose.
  c.data.clean = ml_collections.ConfigDict()
  c.data.clean.strip_bom = True  # a leading byte-order mark is an encoding marker, not text
  c.data.clean.remove_control_chars = True  # C0/C1 controls except tab, newlines, form feed
  c.data.clean.fix_mojibake = False  # ftfy.fix_encoding ('cafÃ©' -> 'café'); off: code may hold such text on purpose
  c.data.clean.unicode_form = 'NFC'  # 'NFC', 'NFKC' (also folds ligatures, full-width forms: not for code) or ''
  c.data.clean.normalize_punctuation = False  # curly quotes, dashes, ellipses, odd spaces -> ASCII
  c.data.clean.lowercase = False
  c.data.clean.unix_line_endings = True  # '\r\n' and '\r' -> '\n'
  # Quality filters: a document failing one is dropped. 0 turns a filter off.
  c.data.clean.min_chars = 1  # shorter documents are dropped; whitespace-only ones always are
  c.data.clean.max_chars = 1_000_000  # longer documents are dropped (the stdlib's largest file is 757 kB)
  c.data.clean.max_repeated_line_fraction = 0.0  # Gopher: 0.3 of non-blank lines repeating an earlier one
  c.data.clean.max_repeated_ngram_fraction = 0.0  # Gopher: 0.15 of characters in repeated word n-grams
  c.data.clean.ngram_size = 5  # n for the filter above
  c.data.clean.max_symbol_word_ratio = 0.0  # Gopher: 0.1 '#' or '...' per word
  # Deduplication, over the whole corpus before splitting: the first occurrence is kept.
  c.data.clean.exact_dedup = True  # same text up to whitespace and case
  c.data.clean.near_dedup = True  # MinHash LSH (datasketch) over word shingles
  # Measured by tools/near_dup_recall.py (docs/data.md): copies of 1,000-word documents with 3% of their
  # words edited are all caught (5-word shingles at 0.8 caught a quarter), and no two distinct ones are.
  c.data.clean.near_dedup_threshold = 0.7  # estimated Jaccard similarity that makes a near duplicate
  c.data.clean.shingle_size = 2  # words per shingle: short ones survive scattered edits
  c.data.clean.num_perm = 128  # MinHash permutations: more is more exact and slower

  # Profanity/toxicity and PII (jaxgpt/safety.py, reusable for prompts and outputs).
  c.data.safety = ml_collections.ConfigDict()
  c.data.safety.profanity = 'off'  # 'off', 'flag' (counted, kept) or 'drop'
  c.data.safety.classifier_threshold = 0.9  # alt-profanity-check probability that flags a line; 0 = word lists only
  # Share of a document's distinct lines that must be flagged to make it profane (docs/data.md, measured on plays);
  # a short text is judged by its few lines. 0 = any one flagged line.
  c.data.safety.flagged_line_fraction = 0.075
  c.data.safety.blocked_words = ()  # whole words (any case) that make a document profane
  c.data.safety.blocked_words_file = ''  # more such words, one per line
  c.data.safety.scrub_pii = False  # e-mail addresses, phone numbers, IP addresses -> <EMAIL>, <PHONE>, <IP>

  # Fine-tuning (docs/finetuning.md): start from a base model, trained with that model's tokenizer.
  c.init_from = ''  # a Hugging Face directory (GPT-2, Llama) or a jaxgpt run directory; '' = random init
  # LoRA (jaxgpt/lora.py): train low-rank adapters on the frozen init_from model instead of every weight.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # r of each adapter pair A [fan_in, r], B [r, fan_out]; 0 = off (full fine-tuning)
  c.lora.alpha = 16.0  # the adapters' update A @ B is scaled by alpha / rank
  c.lora.dropout = 0.0  # in training, each entry of A is dropped with this probability (one mask per step)
  # The kernels adapted: any of 'query', 'key', 'value', 'out', 'mlp_up', 'mlp_down', 'mlp_gate' (SwiGLU only).
  c.lora.targets = ('query', 'key', 'value', 'out')
  # DPO (jaxgpt/preference.py, train.objective='dpo'): init_from tuned toward the chosen responses of preference
  # pairs, against init_from itself, frozen, as the reference (with LoRA: the same weights, adapters off).
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # the implicit reward is beta * log(policy / reference): larger keeps closer to the reference
  c.dpo.label_smoothing = 0.0  # the share of pairs taken to be mislabelled (conservative DPO); loss='sigmoid' only
  c.dpo.loss = 'sigmoid'  # 'sigmoid' (DPO) or 'ipo' (IPO: squared, on per-token mean log-ratios)

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 = num_heads; fewer gives grouped-query attention
  c.model.embed_dim = 256
  c.model.mlp_dim = 1024
  c.model.max_len = 128
  # GPT-2 by default; 'rope' + 'rmsnorm' + 'swiglu' + no bias + untied output is Llama-style.
  c.model.position = 'learned'  # 'learned' or 'rope'
  c.model.rope_theta = 10000.0
  c.model.rotary_dim = 0  # RoPE rotates each head's first rotary_dim dimensions (GPT-J, GPT-NeoX); 0 = all
  c.model.rope_interleaved = False  # RoPE pairs dimensions (2i, 2i+1) (GPT-J), not (i, i+R/2) (Llama, NeoX)
  # 'none' or 'llama3' (Llama 3.1+: wavelengths past rope_original_max_len / low_freq_factor stretched by factor)
  c.model.rope_scaling = 'none'
  c.model.rope_scaling_factor = 8.0
  c.model.rope_low_freq_factor = 1.0
  c.model.rope_high_freq_factor = 4.0
  c.model.rope_original_max_len = 8192
  c.model.sliding_window = 0  # >0: a token attends to itself and the sliding_window - 1 before it (Mistral)
  c.model.norm = 'layernorm'  # 'layernorm' or 'rmsnorm'
  c.model.norm_epsilon = 1e-5
  c.model.mlp = 'gelu'  # 'gelu' (tanh approximation: GPT-2), 'gelu_exact' (erf: GPT-NeoX) or 'swiglu'
  c.model.use_bias = True  # biases on every projection
  c.model.qkv_bias = False  # biases on query, key and value even without use_bias (Qwen2)
  c.model.mlp_bias = False  # biases in the MLP even without use_bias (GPT-J)
  c.model.output_bias = False  # a bias on the output projection (GPT-J)
  c.model.parallel_residual = False  # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, GPT-NeoX), not one after the other
  c.model.shared_norm = False  # parallel_residual: one norm feeds both (GPT-J), not one each (GPT-NeoX)
  c.model.tie_embeddings = True  # output projection = token embedding transposed
  # 'auto' (cuDNN on GPU where it applies, else XLA), 'xla', 'cudnn' or 'splash' (JAX's Pallas kernel for
  # TPU; interpreted, slowly, elsewhere; needs seq_len a multiple of 128).
  c.model.attention = 'auto'
  c.model.dropout_rate = 0.0
  # Compute dtype (parameters and optimizer state stay float32): 'auto' is bfloat16 on GPU/TPU and
  # float32 on CPU, where bf16 matmuls are slower; or 'float32', 'bfloat16'.
  c.model.dtype = 'auto'
  c.model.scan_layers = True  # compile time independent of depth
  c.model.remat = 'dots'  # 'none', 'full', 'dots' (save matmul outputs) or 'offload' (keep them on the host)
  # >0: compute the loss's logits this many tokens at a time, never all batch x seq x vocab of them
  # at once (worth it for large vocabularies); must divide the tokens per microbatch.
  c.model.loss_chunk = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.optim.warmup_steps = 30
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False  # norms and biases are never decayed
  c.optim.grad_clip = 1.0
  c.optim.grad_accum_steps = 1  # microbatches per step; batch_size must divide

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.objective = 'lm'  # 'lm' (next-token loss on the loss mask) or 'dpo' (preference pairs; see c.dpo)
  # > 0: train this many passes over the training split instead (fractions allowed); num_steps is then set from it.
  c.train.num_epochs = 0.0
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.eval_batches = 8  # per validation: batches drawn at random (the same each time) from the held-out split
  # The last validation reads the whole held-out split: the figures the run reports. Turn it off
  # when that split is too large to read at the end of every run.
  c.train.final_eval_whole_split = True
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3  # the newest steps kept; older ones are deleted once a newer save is complete
  c.train.keep_every = 0  # also keep, for good, every checkpoint whose step is a multiple of this; 0 = none
  # Also keep the checkpoint of the lowest validation loss (saved at each new best); results.json names its step.
  c.train.keep_best = False
  c.train.early_stopping_patience = 0  # stop after this many validations without a lower loss; 0 = never
  c.train.wandb_project = ''  # log metrics to this Weights & Biases project too (jaxgpt[wandb]); '' = off
  # A step whose loss, gradient or update is NaN/Inf is never applied; then 'skip' goes on (counted and
  # logged), 'stop' exits naming the step.
  c.train.on_nonfinite = 'skip'
  c.train.peak_flops_per_device = 0.0  # 0 = look up the device, or measure a matmul on CPU
  # XLA's persistent compilation cache: a restarted job reuses compiled steps. '' disables it.
  c.train.compilation_cache_dir = '~/.cache/jaxgpt/xla'

  # The device mesh (docs/sharding.md). data, fsdp and tensor shape the devices of one slice (a TPU
  # slice, or a GPU host: devices on fast links); -1 takes the devices the other axes leave.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Several slices (TPU multi-slice, several GPU hosts): how the data and fsdp axes also span them
  # over the slower data-centre network. -1 takes the slices dcn_fsdp leaves, so by default the
  # batch is split across slices and each slice holds a full copy of what mesh.fsdp shards.
  c.mesh.dcn_data = -1
  c.mesh.dcn_fsdp = 1
  # Overrides of jaxgpt.sharding.LOGICAL_RULES, e.g. (('vocab', None),) to replicate the vocabulary.
  c.mesh.rules = ()

  # Multi-host start-up (jax.distributed). Leave empty on one host. On TPU VMs and under
  # SLURM set auto=True and JAX finds the coordinator itself; elsewhere give all three.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.auto = False
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ('def ', 'import os\n', 'class ')
  c.sample.max_new_tokens = 64
  c.sample.temperature = 0.8
  c.sample.top_k = 40

  # Generation metrics during training (jaxgpt.evaluate computes them, and more, afterwards).
  c.eval = ml_collections.ConfigDict()
  c.eval.references = ''  # JSONL of {"prompt", "reference"}: BLEU/ROUGE at every validation; '' = off
  c.eval.max_examples = 32  # the first examples of the file
  c.eval.max_new_tokens = 32  # greedy continuation length per prompt
  return c


def define_config_flag():
  """Defines --config (file) with --config.a.b=value overrides."""
  return config_flags.DEFINE_config_file(
      'config', None, 'Path to an ml-collections config file, e.g. configs/quickstart.py.',
      lock_config=True)


def _config_path(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with config mistakes reported in one readable line."""
  path = _config_path(argv[1:])
  if path is not None and not os.path.isfile(path.split(':', 1)[0]):
    _fail(f'config file {path.split(":", 1)[0]!r} does not exist. '
          'Pass an existing file, e.g. --config configs/quickstart.py.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}. Run with --helpfull to see the flags.')
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    _fail(f'unknown config field in {" ".join(bad)} ({e}). '
          f'Check the spelling against the fields of {path}.')
  except SyntaxError as e:
    _fail(f'config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}. Fix the file.')
  except Exception as e:  # the config file is Python: running it can raise anything
    _fail(f'config file {path} failed to load ({type(e).__name__}: {e}). Fix the file.')
  return []  # unreachable: _fail exits


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
  """Runs `main` under absl with readable errors for flags and JaxgptError."""

  flags.DEFINE_boolean('verbose', False, 'On an error, print the Python traceback too (for bug reports).')

  def guarded_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
    try:
      main(argv)
    except JaxgptError as e:
      if flags.FLAGS.verbose:
        traceback.print_exc()
      _fail(str(e))

  try:
    app.run(guarded_main, flags_parser=_parse_flags)
  except SystemExit as e:
    # absl prints the help asked for, then exits 1; asking for help is not a failure.
    if e.code == 1 and any(arg in ('-h', '--help', '--helpshort', '--helpfull') for arg in sys.argv[1:]):
      sys.exit(0)
    raise


def require_extra(extra: str, *modules: str) -> None:
  """Fails clearly when an optional dependency is missing, naming the pip extra that brings it."""
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise JaxgptError(f'{", ".join(missing)} not installed: they come with jaxgpt\'s {extra!r} extra. '
                      f'Run: pip install -e ".[{extra}]"')


def require_config(config: ConfigDict | None) -> ConfigDict:
  if config is None:
    raise JaxgptError('no config given. Pass --config configs/quickstart.py (or another file in configs/).')
  return config


# One for the whole mixture: a source's entry cannot override them.
_MIXTURE_SHARED = ('mixture', 'tokenizer', 'vocab_size', 'cache_dir', 'shuffle')


def mixture_parts(data_cfg: ConfigDict) -> dict[str, tuple[float, ConfigDict]]:
  """data.mixture as {name: (weight, that source's data config)}: data.* with the entry's fields over it."""
  parts = {}
  for name, entry in data_cfg.mixture.items():
    where = f'data.mixture.{name}'
    if not isinstance(entry, ConfigDict):
      raise JaxgptError(f"{where} must be a dict of data fields with a 'weight', e.g. {{'weight': 0.7, "
                        "'source': 'jsonl', 'path': 'web.jsonl'}.")
    overrides = entry.to_dict()
    weight = overrides.pop('weight', None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float('inf'):
      raise JaxgptError(f'{where}.weight={weight!r} must be a positive number: the share of the tokens '
                        'trained on that comes from this source (weights are normalised to sum to 1).')
    shared = sorted(set(overrides) & set(_MIXTURE_SHARED))
    if shared:
      raise JaxgptError(f'{where} sets {", ".join(shared)}, which one mixture shares (one tokenizer, one cache, '
                        f'one shuffle): set data.{shared[0]} instead.')
    part = ConfigDict(data_cfg.to_dict())
    part.mixture = ConfigDict()
    _override(part, overrides, where)
    parts[name] = (float(weight), part)
  return parts


def _override(node: ConfigDict, overrides: dict, where: str) -> None:
  for key, value in overrides.items():
    if key not in node:
      raise JaxgptError(f'{where}.{key} is not a data field: a mixture entry overrides fields of config.data '
                        '(jaxgpt/config.py:base_config) and sets its weight.')
    if isinstance(node[key], ConfigDict) and isinstance(value, dict):
      _override(node[key], value, f'{where}.{key}')
    else:
      try:
        node[key] = value
      except TypeError as e:
        raise JaxgptError(f'{where}.{key}={value!r}: {e}.') from None


# data.source's kinds (jaxgpt/data/sources/__init__.py).
_SOURCES = ('stdlib', 'dir', 'jsonl', 'parquet', 'arrow', 'warc', 'wikipedia', 'tfds')


def _architecture_problems(m: ConfigDict) -> list[str]:
  """What is wrong with the model section's architecture options (RoPE, window, norms, parallel blocks)."""
  problems = []
  head_dim = m.embed_dim // m.num_heads
  rotated = m.rotary_dim or head_dim
  if m.position == 'rope' and (rotated % 2 or not 0 <= m.rotary_dim <= head_dim):
    problems.append(f'RoPE rotates pairs of dimensions: model.rotary_dim={m.rotary_dim} must be even and at most '
                    f'the head dimension {head_dim} (0 = all of it)' if m.rotary_dim else
                    f'RoPE needs an even head dimension; embed_dim/num_heads = {head_dim}')
  rope_only = [f'model.{name}' for name, default in (('rotary_dim', 0), ('rope_interleaved', False),
                                                       ('rope_scaling', 'none')) if m[name] != default]
  if m.position != 'rope' and rope_only:
    problems.append(f"{', '.join(rope_only)} shape RoPE, and model.position={m.position!r}: set position='rope'")
  if m.rope_scaling == 'llama3' and not (m.rope_scaling_factor >= 1 and 0 < m.rope_low_freq_factor
                                         < m.rope_high_freq_factor and m.rope_original_max_len > 0):
    problems.append('the llama3 RoPE scaling needs rope_scaling_factor >= 1, 0 < rope_low_freq_factor < '
                    'rope_high_freq_factor and rope_original_max_len > 0 (Llama 3.1: 8, 1, 4, 8192)')
  if m.sliding_window < 0:
    problems.append(f'model.sliding_window={m.sliding_window} must be 0 (off) or positive')
  if m.sliding_window and m.attention == 'splash':
    problems.append("model.attention='splash' has no sliding window here; with model.sliding_window use 'auto'")
  if not m.norm_epsilon > 0:
    problems.append(f'model.norm_epsilon={m.norm_epsilon} must be positive')
  if m.shared_norm and not m.parallel_residual:
    problems.append('model.shared_norm=True shares a norm between the parallel attention and MLP: it needs '
                    'model.parallel_residual=True')
  return problems


def validate(config: ConfigDict) -> None:
  """Checks the relations between fields that no single field type can express."""
  m, t, d, o = config.model, config.train, config.data, config.optim
  sizes = {'seq_len': config.seq_len, 'batch_size': config.batch_size, 'model.num_layers': m.num_layers,
           'model.num_heads': m.num_heads, 'model.embed_dim': m.embed_dim, 'model.mlp_dim': m.mlp_dim,
           'model.max_len': m.max_len, 'optim.grad_accum_steps': o.grad_accum_steps,
           'data.vocab_size': d.vocab_size}
  not_positive = [f'{name}={value}' for name, value in sizes.items() if value <= 0]
  if not_positive:  # checked first: the relations below divide by these
    raise JaxgptError(f'invalid config: {", ".join(not_positive)} must be positive.')
  problems = []
  if m.embed_dim % m.num_heads:
    problems.append(f'model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}')
  if config.seq_len > m.max_len:
    problems.append(f'seq_len={config.seq_len} exceeds model.max_len={m.max_len}; raise model.max_len or lower seq_len')
  if config.batch_size % o.grad_accum_steps:
    problems.append(f'batch_size={config.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}')
  # A mixture reads its sources' settings: data.* with each entry's fields over them.
  sources = [(f'data.mixture.{name}.', part) for name, (_, part) in mixture_parts(d).items()] or [('data.', d)]
  for p, source in sources:
    if source.source not in _SOURCES:
      problems.append(f'{p}source={source.source!r} is not one of {", ".join(map(repr, _SOURCES))}')
    if source.source not in ('stdlib', 'tfds') and not source.path:
      problems.append(f'{p}source={source.source!r} needs {p}path (its files, a directory or a glob)')
    if source.filter_field and source.source not in ('jsonl', 'parquet', 'arrow'):
      problems.append(f'{p}filter_field applies to records with fields: source jsonl, parquet or arrow, '
                      f'not {source.source!r}')
    if not source.filter_min <= source.filter_max:
      problems.append(f'{p}filter_min={source.filter_min} exceeds {p}filter_max={source.filter_max}')
    if not 0 <= source.min_language_score <= 1:
      problems.append(f'{p}min_language_score={source.min_language_score} must be a probability, 0 to 1')
    if source.on_bad_shard not in ('skip', 'error'):
      problems.append(f"{p}on_bad_shard={source.on_bad_shard!r} is not 'skip' or 'error'")
    if source.on_bad_utf8 not in ('skip', 'repair', 'error'):
      problems.append(f"{p}on_bad_utf8={source.on_bad_utf8!r} is not 'skip', 'repair' or 'error'")
    if not 0 < source.val_fraction < 1:
      problems.append(f'{p}val_fraction={source.val_fraction} must be between 0 and 1')
  for field, allowed in (('remat', ('none', 'full', 'dots', 'offload')), ('position', ('learned', 'rope')),
                         ('norm', ('layernorm', 'rmsnorm')), ('mlp', ('gelu', 'gelu_exact', 'swiglu')),
                         ('rope_scaling', ('none', 'llama3')),
                         ('attention', ('auto', 'xla', 'cudnn', 'splash')),
                         ('dtype', ('auto', 'float32', 'bfloat16'))):
    if m[field] not in allowed:
      problems.append(f'model.{field}={m[field]!r} is not one of {", ".join(map(repr, allowed))}')
  if m.attention == 'splash' and config.seq_len % 128:
    problems.append(f"model.attention='splash' tiles the sequence by 128; seq_len={config.seq_len} is not a "
                    'multiple of 128 (use 128, 256, ... or attention=auto)')
  # Checked now, not when the samples at the end of a finished run would fail on them.
  for name, section, used in (('sample', config.sample, config.sample.prompts),
                              ('eval', config.eval, config.eval.references)):
    if used and not 0 < section.max_new_tokens < m.max_len:
      problems.append(f'{name}.max_new_tokens={section.max_new_tokens} must be between 1 and '
                      f'{m.max_len - 1} (model.max_len={m.max_len} holds the prompt and the new tokens)')
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    problems.append(f'model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}')
  problems += _architecture_problems(m)
  for name in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every', 'eval_batches', 'keep_checkpoints'):
    if t[name] <= 0:
      problems.append(f'train.{name}={t[name]} must be positive')
  if t.keep_every < 0:
    problems.append(f'train.keep_every={t.keep_every} must be 0 (off) or positive')
  if t.on_nonfinite not in ('skip', 'stop'):
    problems.append(f"train.on_nonfinite={t.on_nonfinite!r} is not 'skip' or 'stop'")
  if t.num_epochs < 0 or t.early_stopping_patience < 0:
    problems.append(f'train.num_epochs={t.num_epochs} and train.early_stopping_patience='
                    f'{t.early_stopping_patience} must be 0 (off) or positive')
  if problems:
    raise JaxgptError('invalid config: ' + '; '.join(problems) + '.')
