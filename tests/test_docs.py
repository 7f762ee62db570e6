"""Every command the docs show a user runs, exactly as written, here.

The commands are read from the fenced blocks of README.md and docs/*.md; TABLE says how each
one runs. Most run as written in a sandbox set up the way the command expects (a working
directory with `configs` and `tools`, HOME holding `~/models/gpt2`, `~/my_texts`, ...), made
tiny by APPENDING overrides (absl lets a later flag win). What cannot run on a CPU without a
network (GPU wheels, Cloud TPU, a SLURM cluster) has a stated reason and the strongest check
that runs here. A command the docs gain without an entry here, or an entry whose command left
the docs, fails test_every_doc_command_is_in_the_table_and_every_entry_in_the_docs: the docs
cannot drift from the tests.

The commands of one page run in page order in one sandbox (a flow), so the sample command uses
the run the train command made. tests/test_end_to_end.py continues these flows with its own
steps, so that no config is trained twice; the flows run two at a time (`command_runs` in
tests/conftest.py).
"""

import ast
import contextlib
import dataclasses
import fcntl
import glob
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

import corpora
from conftest import GPT2_ARCHITECTURE, REPO, TINY_OVERRIDES, override_args

# --- reading commands from the docs -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
  page: str  # relative to the repository, e.g. 'docs/gpu.md'
  line: int  # where the command starts, 1-based
  text: str  # as a shell reads it: continuations joined, `$ ` prompt and trailing comment removed
  shown_output: str = ''  # what the page shows under a `$ ` command
  inside: str = ''  # the command that runs this one on other machines (gcloud ... --command='...', srun)

  @property
  def key(self) -> str:
    return ' '.join(self.text.split())


def split_shell(source: str) -> list[tuple[int, str]]:
  """(line offset, command) for each command in shell source, split as bash splits it.

  A backslash-newline joins lines; a newline inside quotes does not end a command; `#` at the
  start of a word starts a comment; `&&` separates commands.
  """
  commands, current, quote = [], [], ''
  line = start = 0

  def finish():
    text = ''.join(current).strip()
    if text:
      commands.append((start, text))
    current.clear()

  i = 0
  while i < len(source):
    ch = source[i]
    if not ''.join(current).strip():
      start = line
    if quote:
      current.append(ch)
      if ch == quote:
        quote = ''
      elif ch == '\\' and quote == '"':
        current.append(source[i + 1])
        i += 1
    elif source.startswith('\\\n', i):
      current.append(' ')
      i += 1
    elif ch in '\'"':
      quote = ch
      current.append(ch)
    elif ch == '#' and (not current or current[-1].isspace()):
      while i + 1 < len(source) and source[i + 1] != '\n':
        i += 1
    elif ch == '\n':
      finish()
    elif source.startswith('&&', i):
      finish()
      i += 1
    else:
      current.append(ch)
    line += source[i] == '\n'
    i += 1
  finish()
  return commands


def _fenced_blocks(markdown: str):
  """(language, line number of the block's first line, lines) of each fenced block."""
  lines = markdown.splitlines()
  i = 0
  while i < len(lines):
    opening = re.match(r'\s*```(\w*)\s*$', lines[i])
    if opening:
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == '```')
      yield opening.group(1), i + 2, lines[i + 1:end]
      i = end
    i += 1


# A command run by another one on other machines: gcloud's --command='...', and srun's.
_INNER = re.compile(r"--command='(?P<quoted>[^']*)'|^srun\s+(?P<srun>.*)$", re.S)


def commands_in(page: str, markdown: str) -> list[Command]:
  """The commands of one Markdown page, in page order.

  `bash` blocks hold commands; a block without a language holds commands only on `$ ` lines,
  each followed by the output the page shows for it; a `python` block is one snippet. jaxgpt
  commands that another command runs (gcloud ... --command='...', srun ...) follow it.
  """
  found = []
  for language, first, lines in _fenced_blocks(markdown):
    if language in ('bash', 'sh', 'shell'):
      found += [Command(page, first + offset, text) for offset, text in split_shell('\n'.join(lines))]
    elif language == 'python':
      found.append(Command(page, first, '\n'.join(lines)))
    elif language == '':
      starts = [i for i, line in enumerate(lines) if line.startswith('$ ')] + [len(lines)]
      for start, end in zip(starts, starts[1:]):
        length = 1
        while lines[start + length - 1].endswith('\\'):
          length += 1
        [(_, text)] = split_shell('\n'.join(lines[start:start + length])[2:])
        found.append(Command(page, first + start, text, shown_output='\n'.join(lines[start + length:end])))
  with_inner = []
  for command in found:
    with_inner.append(command)
    for match in _INNER.finditer(command.text):
      for _, inner in split_shell(match.group('quoted') or match.group('srun')):
        if re.search(r'python3? (-m jaxgpt\.|tools/)', inner):
          with_inner.append(Command(page, command.line, inner, inside=command.key))
  return with_inner


def doc_pages() -> list[str]:
  return ['README.md', *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))]


def doc_commands() -> list[Command]:
  return [c for page in doc_pages() for c in commands_in(page, open(os.path.join(REPO, page)).read())]


# --- how each command runs ----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """One step of a flow: a command run (returncode, output), a snippet executed, or an error."""
  label: str
  command: str = ''
  returncode: int | None = None
  stdout: str = ''
  stderr: str = ''
  seconds: float = 0.0
  error: str = ''  # why the step could not run at all

  def tail(self) -> str:
    return f'{self.error}\n--- stdout:\n{self.stdout[-2000:]}\n--- stderr:\n{self.stderr[-2500:]}'


@dataclasses.dataclass(frozen=True)
class Run:
  """Runs as written in the flow's directory, `append` added to its end (a later flag wins).

  `expect` checks the output beyond the exit status and the figures every command of its kind
  must print (FIGURES).
  """
  append: str = ''
  env: tuple = ()  # (name, value) pairs the command expects in its environment
  exit_code: int = 0
  expect: Callable | None = None  # expect(result, flow) raises AssertionError

  def command(self, text: str) -> str:
    # Before a pipe, the flags still go to the command and not to `tee`.
    pipe = re.search(r'\s+(2>&1\s*)?\|', text)
    cut = pipe.start() if pipe else len(text)
    return f'{text[:cut]} {self.append}{text[cut:]}' if self.append else text


@dataclasses.dataclass(frozen=True)
class Serve(Run):
  """Starts the server in the background, waits for /health, runs the Requests that follow, stops it."""


@dataclasses.dataclass(frozen=True)
class Request(Run):
  """A request to the server started by the Serve step before it."""


@dataclasses.dataclass(frozen=True)
class Snippet(Run):
  """A Python block, run as written by `python -c` in the flow's directory, between `before` and `after`.

  `before` is what the page says the snippet goes into (e.g. a config file's get_config); `after`
  prints what `expect` checks.
  """
  before: str = ''
  after: str = ''

  def command(self, text: str) -> str:
    return f'python -c {shlex.quote(self.before + text + self.after)}'


@dataclasses.dataclass(frozen=True)
class SnippetRequest(Snippet, Request):
  """A Python block run as a Snippet while the server started by the Serve step before it is up."""


@dataclasses.dataclass(frozen=True)
class NotHere:
  """Cannot run on a CPU without a network; `check(command, flow)` is the strongest check that runs here."""
  reason: str
  check: Callable | None = None


def append(overrides: dict, *flags: str) -> str:
  return ' '.join(shlex.quote(arg) for arg in (*override_args(overrides), *flags))


# Sizes that make every config tiny; data settings match between the commands that share a dataset.
STDLIB_DATA = {'data.max_docs': TINY_OVERRIDES['data.max_docs'], 'data.vocab_size': 512, 'data.num_workers': 1}
PROSE_DATA = {'data.vocab_size': 512, 'data.num_workers': 1}
QUICKSTART_TINY = {**{k: v for k, v in TINY_OVERRIDES.items() if k not in GPT2_ARCHITECTURE}, **STDLIB_DATA,
                   'train.num_steps': 10}
# The shape of tests/hf_models.py's save_gpt2 (2 layers, 2 heads, width 32, context 64).
FINETUNE_TINY = {'model.num_layers': 2, 'model.num_heads': 2, 'model.embed_dim': 32, 'model.mlp_dim': 128,
                 'model.max_len': 64, 'seq_len': 32, 'batch_size': 4, 'data.num_workers': 1,
                 'optim.warmup_steps': 1, 'train.num_steps': 3, 'train.eval_every': 3, 'train.eval_batches': 1,
                 'train.checkpoint_every': 3, 'train.log_every': 1, 'train.peak_flops_per_device': 1e11,
                 'sample.max_new_tokens': 4}
# The GPU/TPU configs at CPU size; their batch and accumulation stay, the rows are only 32 tokens.
CLUSTER_TINY = {'seq_len': 32, 'data.vocab_size': 512, 'data.num_workers': 1, 'model.num_layers': 2,
                'model.embed_dim': 32, 'model.mlp_dim': 64, 'model.max_len': 64, 'optim.warmup_steps': 1,
                'train.num_steps': 2, 'train.log_every': 1, 'train.eval_every': 2, 'train.eval_batches': 1,
                'train.checkpoint_every': 2, 'train.peak_flops_per_device': 1e11, 'sample.prompts': '()'}
LLAMA_1B_TINY = {**CLUSTER_TINY, 'model.num_heads': 4, 'model.num_kv_heads': 2}
GPT2_TINY = {**CLUSTER_TINY, 'model.num_heads': 2}
# A cluster's shared filesystem, here: the sandbox's own paths.
ON_THIS_MACHINE = ('--config.data.path=corpus.jsonl', '--config.data.cache_dir=~/.cache/jaxgpt',
                   '--config.distributed.auto=False')
BENCH_TINY = append({'model.num_layers': 1, 'model.num_heads': 2, 'model.embed_dim': 32, 'model.mlp_dim': 64,
                     'model.max_len': 32, 'seq_len': 32, 'batch_size': 2, 'data.vocab_size': 256,
                     'train.peak_flops_per_device': 1e11},
                    '--steps', '1', '--rounds', '1')
NEAR_DUP_FEW = '--docs 8 --copies 1 --min_words 200 --shingle_sizes 5 --thresholds 0.5 --rates 0.03 --shared 0.7'
BENCH_ON_A_TINY_CONFIG = f'--config configs/quickstart.py {BENCH_TINY}'  # --config replaces the presets' shapes

# Figures a command of each kind prints; each must be there and finite.
FIGURES = {
    'python -m jaxgpt.train': r'validation loss (\S+) \| perplexity (\S+) \| (\S+) bits/byte',
    'python -m jaxgpt.evaluate --tasks': r'\|\s*([^|\s]+)\s*\|±',  # each value of lm-eval's table
    'python -m jaxgpt.evaluate --compare': r'^(\d+) prompts continued by both runs',
    'python -m jaxgpt.evaluate --task ': r'(?:pass@\d+|ROUGE-\w|BLEU|exact match|F1|accuracy) (\S+)',  # recipes.md
    'python -m jaxgpt.evaluate': r'loss (\S+) \| perplexity (\S+) \| bits per byte (\S+)',
    'python -m jaxgpt.prepare': r'tokenizer: .* (\S+) tokens/byte',
    'python tools/plan.py': r'total\s+(\S+)',
    'python tools/bench.py': r'(\S+)%',
    'python tools/bench_decode.py': r'^\| \d+ \| ([\d,]+) \| ([\d,]+) \|',
    'python tools/bench_data.py': r'^slowest stage in one process, \w+: .* \((\S+) MB/s\)$',
    'python tools/sweep.py': r'"bits_per_byte": ([^,}]+)',
    'python tools/near_dup_recall.py': r'^\| \d+ \| \d+ \| [\d.]+ \| (\S+)%',
    'curl -s localhost:8765/metrics': r'^\w+(?:\{.*\})? (\S+)$',  # Prometheus' text format (docs/serving.md)
    'curl': r'"completion_tokens":\s*(\S+?)[,}]',
}


def figures(command: str, output: str) -> list[float]:
  """The figures `command` printed; [] if its kind prints none. Fails if one is missing or not finite."""
  kind = next((k for k in FIGURES if re.sub(r'^\S*python3?\b', 'python', command).startswith(k)), None)
  if kind is None or (kind == 'curl' and '"error"' in output):
    return []
  found = [value.replace(',', '') for match in re.finditer(FIGURES[kind], output, re.M) for value in match.groups()]
  assert found, f'no figure matching {FIGURES[kind]!r} in the output'
  assert all(re.fullmatch(r'[-+\d.eE]+', x) and math.isfinite(float(x)) for x in found), f'not finite: {found}'
  assert not re.search(r'\b(nan|inf)\b', output, re.I), 'NaN or Inf in the output'
  return [float(x) for x in found]


# --- what a flow runs in ------------------------------------------------------------------------


def _docs_texts() -> dict[str, str]:
  return {os.path.basename(p): open(os.path.join(REPO, p)).read() for p in doc_pages()}


def _paragraphs() -> list[str]:
  return [p.strip() for text in _docs_texts().values() for p in text.split('\n\n') if len(p.strip()) > 80]


def _write_jsonl(path: str, records) -> None:
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def make_home(home: str) -> None:
  """What the docs' commands expect in ~: a Hugging Face GPT-2, text directories, a venv and a checkout."""
  from hf_models import save_gpt2
  save_gpt2(os.path.join(home, 'models', 'gpt2'))
  for name, text in _docs_texts().items():  # Markdown for README's --config.data.glob='**/*.md'
    sub = os.path.join(home, 'my_texts', 'docs' if name != 'README.md' else '')
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, name), 'w') as f:
      f.write(text)
  # Prose for configs/web_text.py: the Python language reference's sections, from this Python.
  from pydoc_data.topics import topics
  os.makedirs(os.path.join(home, 'crawl'))
  for name, text in topics.items():
    with open(os.path.join(home, 'crawl', f'{name}.txt'), 'w') as f:
      f.write(text)
  os.symlink(sys.prefix, os.path.join(home, 'venv'))  # ~/venv/bin/python, source ~/venv/bin/activate


def make_workdir(directory: str) -> None:
  """A checkout's stand-in (configs/, tools/) with the input files the docs name, in `directory`."""
  os.makedirs(directory)
  for name in ('configs', 'tools', 'examples'):
    os.symlink(os.path.join(REPO, name), os.path.join(directory, name))
  paragraphs = _paragraphs()
  _write_jsonl(os.path.join(directory, 'corpus.jsonl'), ({'text': p} for p in paragraphs))
  _write_jsonl(os.path.join(directory, 'my_text.jsonl'),
               ({'text': f'The quick brown fox number {i} jumps over the lazy dog.'} for i in range(60)))
  _write_jsonl(os.path.join(directory, 'alpaca.jsonl'),
               ({'instruction': 'Upper-case the word.', 'input': w, 'output': w.upper()}
                for w in ('fox', 'dog', 'cat', 'owl', 'bee', 'elk', 'ant', 'cow', 'yak', 'emu') * 6))
  _write_jsonl(os.path.join(directory, 'prefs.jsonl'),  # docs/finetuning.md's preference pairs
               ({'prompt': f'Upper-case word {i}: {w}', 'chosen': w.upper(), 'rejected': w}
                for i, w in enumerate(('fox', 'dog', 'cat', 'owl', 'bee', 'elk', 'ant', 'cow', 'yak', 'emu') * 4)))
  _write_jsonl(os.path.join(directory, 'chat.jsonl'),
               ({'prompt': f'What does paragraph {i} of the docs say?', 'answer': p} for i, p in enumerate(paragraphs)))
  _write_jsonl(os.path.join(directory, 'refs.jsonl'), [{'prompt': 'import ', 'reference': 'import os'},
                                                       {'prompt': 'def f(', 'reference': 'def f(x):\n    return x'}])
  corpora.write_docs_inputs(directory, paragraphs)  # docs/data.md's corpus sources


@contextlib.contextmanager
def home_as(home: str):
  """HOME set to the sandbox's while Python code here reads `~` paths the way the commands do."""
  saved = os.environ.get('HOME')
  os.environ['HOME'] = home
  try:
    yield
  finally:
    os.environ['HOME'] = saved


@dataclasses.dataclass(frozen=True)
class Step:
  label: str  # the doc command's key, or what an end-to-end step does
  text: str  # the command line (or Python source) as written
  entry: object  # Run, Serve, Request, Snippet or NotHere
  command: Command | None = None

  @property
  def name(self) -> str:
    """Unique in a flow: a page's command may be another page's too (README's and performance.md's quickstart)."""
    return doc_step(self.command.page, self.label) if self.command else self.label


def doc_step(page: str, key: str) -> str:
  return f'{page}: {key}'


@dataclasses.dataclass
class Flow:
  name: str
  directory: str
  home: str
  steps: list
  results: dict = dataclasses.field(default_factory=dict)  # step name -> Result
  done: threading.Event = dataclasses.field(default_factory=threading.Event)


# The pages whose commands share a sandbox, in order; README's quickstart run is performance.md's too.
FLOWS = {
    'quickstart': ('README.md', 'docs/evaluation.md', 'docs/performance.md', 'docs/experiments.md',
                   'docs/serving.md'),
    'data': ('docs/data.md', 'docs/storage.md'),
    'finetuning': ('docs/finetuning.md',),
    'cluster': ('docs/gpu.md', 'docs/tpu.md'),
    'sharding': ('docs/sharding.md',),
    'recipes': ('docs/recipes.md',),
}
# Two at a time, flows that share a data cache directory one after the other in the same lane
# (a rebuilt cache directory is replaced while another process may read it). Flows only
# tests/test_end_to_end.py has go to the second lane.
LANES = (('quickstart', 'data'), ('finetuning', 'cluster', 'sharding', 'recipes'))


class CommandRuns:
  """The flows of the docs (and their end-to-end continuations), run in the background on creation."""

  def __init__(self, root: str, chains: dict[str, list[Step]]):
    self.home, self.xla_cache = os.path.join(root, 'home'), os.path.join(root, 'xla')
    make_home(self.home)
    commands = doc_commands()
    self.flows = {}
    for name, pages in FLOWS.items():
      steps = [Step(c.key, c.text, TABLE[c.page][c.key], c) for page in pages for c in commands if c.page == page]
      self.flows[name] = Flow(name, os.path.join(root, name), self.home, steps + chains.get(name, []))
    for name, steps in chains.items():
      self.flows.setdefault(name, Flow(name, os.path.join(root, name), self.home, steps))
    for flow in self.flows.values():
      make_workdir(flow.directory)
    os.symlink(self.flows['cluster'].directory, os.path.join(self.home, 'jaxgpt'))  # gpu.md's `cd ~/jaxgpt`
    os.makedirs(os.path.join(self.flows['quickstart'].directory, 'runs'))
    os.symlink('quickstart', os.path.join(self.flows['quickstart'].directory, 'runs', 'tiny'))  # README's tiny run
    lanes = [list(LANES[0]), list(LANES[1]) + [n for n in self.flows if not any(n in lane for lane in LANES)]]
    self._pool = ThreadPoolExecutor(max_workers=len(lanes))
    self._lanes = [self._pool.submit(self._run_lane, [self.flows[n] for n in lane]) for lane in lanes]

  def flow(self, name: str) -> Flow:
    flow = self.flows[name]
    assert flow.done.wait(timeout=3600), f'flow {name} did not finish'
    for lane in self._lanes:
      if lane.done() and lane.exception():
        raise lane.exception()
    return flow

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def _run_lane(self, flows: list[Flow]) -> None:
    for flow in flows:
      try:
        self._run_flow(flow)
      finally:
        flow.done.set()

  def env(self, entry) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('JAXGPT_API_KEY', 'XLA_FLAGS')}
    return {**env, 'HOME': self.home, 'PATH': f'{os.path.dirname(sys.executable)}:{env["PATH"]}',
            'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1',
            # Commands that compile what an earlier one did (tools/bench.py's remat sweeps) load it;
            # jaxgpt.train sets its own (~/.cache/jaxgpt/xla, which _quickstart_trained checks).
            'JAX_COMPILATION_CACHE_DIR': self.xla_cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            **dict(getattr(entry, 'env', ()))}

  def _run_flow(self, flow: Flow) -> None:
    server = port = None
    try:
      for step in flow.steps:
        if server and not isinstance(step.entry, Request):
          self._stop(server)
          server = None
        if isinstance(step.entry, Serve):
          port = free_port()  # for a server started on `--port {port}`
        step = dataclasses.replace(step, text=step.text.replace('{port}', str(port)))
        if isinstance(step.entry, NotHere):
          continue  # checked by the test, in the test's process
        if isinstance(step.entry, Serve):
          server, flow.results[step.name] = self._start(step, flow)
        else:
          flow.results[step.name] = self._run(step, flow)
    finally:
      if server:
        self._stop(server)

  def _run(self, step: Step, flow: Flow) -> Result:
    command = step.entry.command(step.text)
    start = time.perf_counter()
    try:
      done = subprocess.run(['bash', '-o', 'pipefail', '-c', command], cwd=flow.directory, env=self.env(step.entry),
                            capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
      return Result(step.label, command, error=f'timed out after {e.timeout} s')
    return Result(step.label, command, done.returncode, done.stdout, done.stderr, time.perf_counter() - start)

  def _start(self, step: Step, flow: Flow):
    command = step.entry.command(step.text)
    port = int(re.search(r'--port[= ](\d+)', command).group(1))
    lock = None
    if step.command:  # a port the page names: another test session on this machine may be serving on it
      lock = open(os.path.join('/tmp', f'jaxgpt-test-port-{port}.lock'), 'w')
      fcntl.flock(lock, fcntl.LOCK_EX)
    log = open(os.path.join(flow.directory, f'serve-{port}.log'), 'w+')
    process = subprocess.Popen(['bash', '-c', f'exec {command}'], cwd=flow.directory, env=self.env(step.entry),
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    result = Result(step.label, command)
    start = time.perf_counter()
    while True:
      try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as response:
          if response.status == 200:
            result.returncode = 0
            break
      except OSError:
        pass
      if process.poll() is not None or time.perf_counter() - start > 300:
        result.error = 'the server did not answer /health' + (f' (exit {process.returncode})' if process.poll() else '')
        break
      time.sleep(0.5)
    result.seconds = time.perf_counter() - start
    return (process, log, lock, result), result

  @staticmethod
  def _stop(server) -> None:
    process, log, lock, result = server
    if process.poll() is None:
      process.terminate()
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.seek(0)
    result.stdout = log.read()
    log.close()
    if lock:
      lock.close()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def check_step(flow: Flow, step: Step) -> str:
  """'' if the step did what its entry says; else what went wrong, with the output."""
  entry = step.entry
  where = f'{step.command.page}:{step.command.line}: ' if step.command else ''
  try:
    if isinstance(entry, NotHere):
      if entry.check:
        with home_as(flow.home):
          entry.check(step.command, flow)
      return ''
    result = flow.results[step.name]
    assert not result.error and result.returncode == entry.exit_code, (
        f'exit {result.returncode}, expected {entry.exit_code}')
    if entry.exit_code == 0:
      figures(result.command, result.stdout)
    if entry.expect:
      with home_as(flow.home):
        entry.expect(result, flow)
  except AssertionError as e:
    result = flow.results.get(step.name)
    return f'{where}{step.label}\n  {e}' + (f'\n  ran: {result.command}\n{result.tail()}' if result else '')
  return ''


# --- the checks of commands that cannot run here ------------------------------------------------


def _requirement_met(requirement) -> bool:
  """Whether a packaging Requirement (jaxgpt[extra] included) is installed."""
  if requirement.name == 'jaxgpt':
    return all(_extra_installed(extra) for extra in requirement.extras)
  try:
    return requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
  except importlib.metadata.PackageNotFoundError:
    return False


def _extra_installed(extra: str) -> bool:
  from packaging.requirements import Requirement
  requirements = [Requirement(r) for r in importlib.metadata.requires('jaxgpt')]
  wanted = [r for r in requirements if r.marker and r.marker.evaluate({'extra': extra})]
  assert wanted, f'pyproject.toml has no extra {extra!r}'
  missing = [str(r) for r in wanted if not _requirement_met(r)]
  assert not missing, f'the {extra!r} extra is not installed: {missing}'
  return True


def _this_checkout_installed_editable(command, flow) -> None:
  installs = [json.loads(d.read_text('direct_url.json') or '{}')
              for d in importlib.metadata.distributions(name='jaxgpt')]
  assert {'url': f'file://{REPO}', 'dir_info': {'editable': True}} in installs, (
      f'jaxgpt is not this checkout installed editable (pip install -e .): {installs}')
  for extras in re.findall(r'\.\[([\w,]+)\]', command.text):
    for extra in extras.split(','):
      _extra_installed(extra)


def _jax_within_the_pin(command, flow) -> None:
  """`pip install -e . "jax[...]"` keeps JAX inside pyproject.toml's range: the one installed here is."""
  from packaging.requirements import Requirement
  pins = tomllib.load(open(os.path.join(REPO, 'pyproject.toml'), 'rb'))['project']['dependencies']
  [jax_pin] = [Requirement(p) for p in pins if Requirement(p).name == 'jax']
  assert _requirement_met(jax_pin), f'jax {importlib.metadata.version("jax")} is outside {jax_pin}'
  _this_checkout_installed_editable(command, flow)


def _pytest_collects_this_suite(command, flow) -> None:
  options = tomllib.load(open(os.path.join(REPO, 'pyproject.toml'), 'rb'))['tool']['pytest']['ini_options']
  assert options['testpaths'] == ['tests'] and os.path.dirname(os.path.abspath(__file__)) == os.path.join(REPO, 'tests')
  _extra_installed('test')


def _hub_cli_installed(command, flow) -> None:
  assert shutil.which('hf', path=os.path.dirname(sys.executable)), 'huggingface_hub brings no `hf` command'


def _download_fetches_what_jaxgpt_reads(command, flow) -> None:
  args = shlex.split(command.text)
  result = subprocess.run([args[0], args[1], '--help'], env={**os.environ, 'HF_HUB_OFFLINE': '1'},
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and '--local-dir' in result.stdout, result.stderr[-2000:]
  # The files jaxgpt reads from a GPT-2 directory (tests/hf_models.py writes the same for the stand-in).
  needed = {'config.json', 'model.safetensors', 'tokenizer.json'}
  assert needed <= set(args) and needed <= set(os.listdir(os.path.join(flow.home, 'models', 'gpt2')))
  assert args[args.index('--local-dir') + 1] == '~/models/gpt2'


# Loads a config with its --config.* flags as jaxgpt.train does, validates it, and plans its mesh.
_CHECK_CONFIG = """
import sys
from absl import flags
from jaxgpt.config import define_config_flag, validate
from tools.plan import plan
define_config_flag()
flags.DEFINE_integer('devices', 1, 'devices the mesh spans')
flags.DEFINE_integer('slices', 1, 'slices (GPU hosts) they form')
flags.FLAGS(sys.argv)
validate(flags.FLAGS.config)
print(plan(flags.FLAGS.config, flags.FLAGS.devices, flags.FLAGS.slices)['mesh'])
"""


def mesh_of(command: str, devices: int, env: dict, slices: int = 1) -> dict:
  """The mesh a `python -m jaxgpt.train ...` line's config resolves to on `devices` in `slices`, its config valid."""
  args = shlex.split(re.sub(r'\$(\w+)', lambda m: env[m.group(1)], command))
  done = subprocess.run([sys.executable, '-c', _CHECK_CONFIG, '--config', args[args.index('--config') + 1],
                         f'--devices={devices}', f'--slices={slices}', *(a for a in args if a.startswith('--config.'))],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return ast.literal_eval(done.stdout.strip())


def _gpu_nodes(page: str) -> tuple[int, int]:
  script = open(os.path.join(REPO, page)).read()
  return tuple(int(re.search(rf'#SBATCH --{name}=(\d+)', script).group(1)) for name in ('nodes', 'gpus-per-node'))


def _sbatch_nodes_match_the_mesh(command, flow) -> None:
  """One task per GPU, each seeing all of its node's; the mesh of the srun line: hosts x GPUs (each host a slice)."""
  script = open(os.path.join(REPO, command.page)).read()
  nodes, gpus = _gpu_nodes(command.page)
  assert int(re.search(r'#SBATCH --ntasks-per-node=(\d+)', script).group(1)) == gpus
  assert not re.search(r'#SBATCH --(gpus-per-task|gpu-bind)', script)  # JAX picks GPU SLURM_LOCALID of all
  assert re.search(r'#SBATCH --signal=TERM@\d+', script) and '#SBATCH --requeue' in script
  assert '$SLURM_JOB_ID' not in command.text  # a requeued or resubmitted job finds its checkpoints
  assert mesh_of(command.text.removeprefix('srun '), nodes * gpus, {}, slices=nodes) == {
      'data': nodes, 'fsdp': gpus, 'tensor': 1}


def _several_nodes_config_is_valid(command, flow) -> None:
  nodes, gpus = _gpu_nodes(command.page)
  settings = dict(re.findall(r'--config\.distributed\.(\w+)=(\S+)', command.text))
  assert re.fullmatch(r'[\w.]+:\d+', settings['coordinator_address']) and settings['num_processes'] == str(nodes)
  assert mesh_of(command.text, nodes * gpus, {'NODE_RANK': '0'}, slices=nodes) == {
      'data': nodes, 'fsdp': gpus, 'tensor': 1}


def _page_command(page: str, pattern: str) -> str:
  [text] = [c.text for c in doc_commands() if c.page == page and re.search(pattern, c.text, re.S)]
  return text


def _page_exports(page: str) -> list[dict]:
  """The variables each `export` line of the page sets, in page order."""
  return [dict(re.findall(r'(\w+)=(\S+)', c.text)) for c in doc_commands()
          if c.page == page and c.text.startswith('export ')]


def _exports_set_the_later_variables(command, flow) -> None:
  exported = {name for values in _page_exports(command.page) for name in values}
  used = {v for c in doc_commands() if c.page == command.page for v in re.findall(r'\$\{?(\w+)', c.text)}
  assert used <= exported, used - exported


def _chips(accelerator_type: str) -> int:
  """The chips of a v5e slice type: its number (v4 and v5p count TensorCores, two per chip)."""
  return int(re.fullmatch(r'v5litepod-(\d+)', accelerator_type).group(1))


def _slice_is_the_planned_device_count(command, flow) -> None:
  """The training slice is the device count the plan checks; the serving slice its --infer_devices."""
  assert '--accelerator-type=$TYPE' in command.text
  training, serving = (_chips(values['TYPE']) for values in _page_exports(command.page))
  plan = _page_command(command.page, r'^python tools/plan\.py .*--infer_devices')
  assert f'--devices {training} ' in plan and f'--infer_devices {serving} ' in plan


def _serving_slice_is_one_vm(command, flow) -> None:
  """v5e's single-VM types are 8 chips or fewer; multi-host slices cannot serve (one program on every worker)."""
  assert _chips(_page_exports(command.page)[-1]['TYPE']) <= 8
  [create] = [c for c in doc_commands() if c.page == command.page and 'queued-resources create' in c.text]
  _slice_is_the_planned_device_count(create, flow)


def _same_resource(command, flow) -> None:
  """describe and delete name the queued resource that create made, where it made it."""
  create = _page_command(command.page, r'queued-resources create')
  for flag in ('--project=$PROJECT', '--zone=$ZONE'):
    assert flag in create and flag in command.text
  assert command.text.split()[5] == create.split()[5] == '$TPU'


def _bucket_in_the_zones_region(command, flow) -> None:
  [zone] = [values['ZONE'] for values in _page_exports(command.page) if 'ZONE' in values]
  assert f'--location={zone.rsplit("-", 1)[0]}' in command.text


def _storage_test_trains_so(command, flow) -> None:
  """Each path the command puts in a bucket, tests/test_storage.py's run puts in its emulated bucket too."""
  source = open(os.path.join(REPO, 'tests', 'test_storage.py')).read()
  args = shlex.split(command.text)
  for before, arg in zip(args, args[1:]):
    if 'gs://' in arg:
      flag = before if arg.startswith('gs://') else arg.split('=')[0]  # --workdir URL, --config.field=URL
      assert (f"'{flag.removeprefix('--config.')}': f'gs://" if flag != '--workdir' else "workdir = f'gs://") in source


def _copied_where_training_reads(command, flow) -> None:
  """gcloud storage's object is the corpus that prepare and training read."""
  destination = command.text.split()[-1]
  for pattern in (r'^~/venv/bin/python -m jaxgpt\.prepare', r'^~/venv/bin/python -m jaxgpt\.train'):
    assert f'--config.data.path={destination}' in _page_command(command.page, pattern)


def _inner(command) -> list[str]:
  """The jaxgpt commands that `command` runs on the VMs (gcloud ... --command='...')."""
  return [c.text for c in doc_commands() if c.inside == command.key]


def _training_reuses_the_prepared_data(command, flow) -> None:
  """Prepare runs on one worker, training on all; both name the same data settings, so training reuses it."""
  train = _page_command(command.page, r'^gcloud .*-m jaxgpt\.train')
  assert '--worker=0 ' in command.text and '--worker=all ' in train

  def data_flags(texts):
    return sorted(flag for text in texts for flag in re.findall(r'--config\.data\.\S+', text))
  assert data_flags(_inner(command)) == data_flags([_page_command(command.page, r'^~/venv/bin/python -m jaxgpt\.train')])
  assert len(data_flags(_inner(command))) == 2


def _inference_reads_the_trained_run(command, flow) -> None:
  """sample, evaluate and serve read the workdir training wrote, on the serving VM (one worker: no --worker)."""
  workdir = re.search(r'--workdir (\S+)', _page_command(command.page, r'^~/venv/bin/python -m jaxgpt\.train')).group(1)
  assert workdir.startswith('gs://') and '--worker' not in command.text
  inner = _inner(command)
  assert inner and all(re.search(r'--workdir (\S+)', text).group(1) == workdir for text in inner)


def _port_forwarded_to_the_server(command, flow) -> None:
  port = re.search(r'--port (\d+)', command.text).group(1)
  assert command.text.endswith(f'-- -L {port}:localhost:{port}')
  assert f'localhost:{port}/' in _page_command(command.page, r'^curl ')
  _inference_reads_the_trained_run(command, flow)


def _code_copied_where_it_is_installed(command, flow) -> None:
  source, destination = command.text.split()[6:8]
  assert source == '~/jaxgpt' and destination == '$TPU:~' and '--worker=all' in command.text
  assert 'cd ~/jaxgpt &&' in _page_command(command.page, r'uv pip install')


def _python_that_jaxgpt_supports(command, flow) -> None:
  """uv's Python meets pyproject's requires-python, which the TPU image's 3.10 does not; JAX within the pin."""
  from packaging.specifiers import SpecifierSet
  requires = SpecifierSet(tomllib.load(open(os.path.join(REPO, 'pyproject.toml'), 'rb'))['project']['requires-python'])
  version = re.search(r'uv venv --python (\S+)', command.text).group(1)
  assert version in requires and '3.10' not in requires
  assert '--worker=all' in command.text
  _jax_within_the_pin(command, flow)


def _as_the_tpu_page_runs_it(pattern: str):
  """README's bucket command is docs/tpu.md's (which runs here with local paths), less the per-worker flags."""
  def check(command, flow):
    tpu = _page_command('docs/tpu.md', pattern).removeprefix('~/venv/bin/')
    flags = set(shlex.split(command.text)) - {'--config.distributed.auto=True'}
    assert flags <= set(shlex.split(tpu)) - {'2>&1', '|', 'tee', '~/train.log'}, flags - set(shlex.split(tpu))
  return check


def _depth_sweep_compiles(command, flow) -> None:
  """tools/bench.py's compile_seconds, scanned and unrolled, on a 2-layer model instead of 12 and 48."""
  sys.path.insert(0, os.path.join(REPO, 'tools'))
  import bench
  for scan in (True, False):
    config = bench.preset_config('tiny')
    config.model.update(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, scan_layers=scan)
    config.data.vocab_size = 256
    assert 0 < bench.compile_seconds(config) < 300


# --- what the output of some commands must show ------------------------------------------------


def _quickstart_trained(result, flow) -> None:
  out = result.stdout
  assert 'data: trained a 512-piece BPE tokenizer' in out
  assert 'step 10/10 | loss' in out and 'tok/s | MFU' in out
  assert 'step 10: validation loss' in out and 'perplexity' in out and 'bits/byte' in out
  assert '--- sample, prompt' in out
  assert os.listdir(os.path.join(flow.directory, 'runs', 'quickstart', 'tensorboard'))
  # The compiled step is in the default persistent cache (~/.cache/jaxgpt/xla), for the restart.
  assert any(n.startswith('jit_train_step') for n in os.listdir(os.path.join(flow.home, '.cache', 'jaxgpt', 'xla')))


def _quickstart_resumed(result, flow) -> None:
  out = result.stdout
  assert 'data: reusing' in out and 'resumed from step 10' in out
  assert 'step 11: compiled' in out and 'step 20/20 | loss' in out and 'step 5/' not in out
  run = os.path.join(flow.directory, 'runs', 'quickstart')
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['10', '20']
  results = json.load(open(os.path.join(run, 'results.json')))
  # It learned: below log(512) = 6.24 nats, the loss of a uniform guess over the 512-piece vocabulary.
  assert results['step'] == 20 and results['loss'] < 6.0
  assert 0.5 < results['bits_per_byte'] < 5.0


def sampled(prompt: str, step: int | None = None):
  """Checks `python -m jaxgpt.sample` output: the step, then the prompt continued by new text."""
  def expect(result, flow):
    out = result.stdout
    assert re.match(r'# step (\d+) of ', out) and (step is None or out.startswith(f'# step {step} of ')), out[:200]
    continuation = out.split(f'--- prompt: {prompt!r}\n', 1)[1]
    assert continuation.startswith(prompt) and len(continuation.rstrip('\n')) > len(prompt)
  return expect


def _shown_output(result) -> str:
  return next(c.shown_output for c in doc_commands() if c.key == result.label)


def _labels_the_page_shows(result, flow) -> None:
  """The output names the figures the page's output names (the figures differ: the page's run was longer)."""
  for label in re.findall(r'[A-Za-z][A-Za-z0-9 -]*[A-Za-z0-9](?= [\d.,]+\b)', _shown_output(result)):
    assert label in result.stdout, f'{label!r} is in the output the page shows, not in this one'


def _evaluated_with_references(result, flow) -> None:
  _labels_the_page_shows(result, flow)
  assert 'results, samples.jsonl and samples.md in runs/tiny/eval/step_10' in result.stdout


def _fields_missing(shown, answer, where='') -> list[str]:
  """The fields of `shown` (recursively) that `answer` lacks or holds as another type."""
  if isinstance(shown, dict) and isinstance(answer, dict):
    return [f for k, v in shown.items() for f in (
        _fields_missing(v, answer[k], f'{where}.{k}') if k in answer else [f'{where}.{k}'])]
  if isinstance(shown, list) and isinstance(answer, list):
    return [f for s, a in zip(shown, answer) for f in _fields_missing(s, a, f'{where}[]')]
  same_type = type(shown) is type(answer) or shown is None or answer is None
  return [] if same_type else [f'{where} ({type(answer).__name__})']


def _json_like_the_page(result, flow) -> None:
  missing = _fields_missing(json.loads(_shown_output(result)), json.loads(result.stdout))
  assert not missing, f'fields the page shows are not in the answer: {missing}'


def _metrics_like_the_page(result, flow) -> None:
  for series in re.findall(r'^(\w+\{.*\}) ', _shown_output(result), re.M):
    assert series in result.stdout, f'{series} is in the metrics the page shows, not in these:\n{result.stdout}'


def _openai_client_answered(result, flow) -> None:
  lines = result.stdout.splitlines()
  assert [line.split(' ', 1)[0] for line in lines[:4]] == ['0', '1', '2', '3'] and len(lines) >= 6, result.stdout


def _completion_like_the_page(result, flow) -> None:
  answer = json.loads(result.stdout)
  missing = _fields_missing(json.loads(_shown_output(result)), answer)
  assert not missing, f'fields the page shows are not in the answer: {missing}'
  assert answer['usage']['completion_tokens'] <= 12 and answer['choices'][0]['finish_reason'] in ('length', 'stop')


def _error_the_page_shows(result, flow) -> None:
  assert json.loads(result.stdout) == json.loads(_shown_output(result))


def _plan_fits(device: str):
  def expect(result, flow):
    assert re.search(rf'{re.escape(device)}\s+\d+ GiB: fits', result.stdout), result.stdout[-500:]
  return expect


def _plan_fits_to_train_and_serve(device: str, serving_devices: int):
  def expect(result, flow):
    _plan_fits(device)(result, flow)
    assert f"on mesh {{'data': 1, 'fsdp': {serving_devices}, 'tensor': 1}}" in result.stdout, result.stdout[-800:]
    assert re.search(rf'{re.escape(device)}\s+\d+ GiB to serve: fits', result.stdout), result.stdout[-500:]
  return expect


def _plan_across_slices(mesh: str):
  def expect(result, flow):
    assert f'mesh {mesh}' in result.stdout and re.search(r'TPU v5e\s+\d+ GiB: fits', result.stdout), result.stdout
  return expect


def _prepared_somewhere(result, flow) -> None:
  assert 'dataset: ' in result.stdout, result.stdout[-500:]


def _reused_prepared_data(result, flow) -> None:
  assert 'data: reusing' in result.stdout, result.stdout[-2000:]  # the prepare command before built it


def _completion_within(max_tokens: int):
  def expect(result, flow):
    answer = json.loads(result.stdout)
    assert isinstance(answer['choices'][0]['text'], str), answer
    assert 0 < answer['usage']['completion_tokens'] <= max_tokens, answer
  return expect


def _mixture_shares_logged(result, flow) -> None:
  assert re.search(r'step 10: tokens trained on by source: code \S+% \(weight 20.0%\) \| notes \S+% '
                   r'\(weight 10.0%\) \| web \S+% \(weight 70.0%\) of ', result.stdout), result.stdout[-2000:]
  assert 'validation loss by source: code ' in result.stdout


def _prepared(reused: bool):
  def expect(result, flow):
    assert ('data: reusing' in result.stdout) == reused and 'dataset: ' in result.stdout
  return expect


def _prepared_all(documents: int, *dropped: str):
  """Built now, having read `documents` and dropped some for each reason in `dropped` (and no other)."""
  def expect(result, flow):
    _prepared(False)(result, flow)
    assert re.search(rf'^  read +{documents} docs', result.stdout, re.M), result.stdout
    assert sorted(re.findall(r'^  dropped: (.+?) +\d', result.stdout, re.M)) == sorted(dropped), result.stdout
  return expect


def _prepared_as_locally(result, flow) -> None:
  """The Beam-prepared cache (its own cache_dir) holds what the quickstart's local one does, speed aside."""
  _prepared(False)(result, flow)
  (beam,) = glob.glob(os.path.join(flow.home, '.cache', 'jaxgpt-beam', 'stdlib-*'))
  local = os.path.join(flow.home, '.cache', 'jaxgpt', os.path.basename(beam))  # the same fingerprint
  for name in ('clean-train.jsonl', 'clean-validation.jsonl'):
    assert open(os.path.join(beam, name), 'rb').read() == open(os.path.join(local, name), 'rb').read(), name
  reports = [json.load(open(os.path.join(d, 'report.json'))) for d in (beam, local)]
  assert reports[0].pop('speed')['runner'] == 'DirectRunner'
  del reports[1]['speed']
  assert reports[0] == reports[1]


def _beam_cluster_command_parses(command, flow) -> None:
  """Its config fields exist and Beam knows every pipeline option it gives; the pipeline itself runs here with the
  DirectRunner (the command before) and in tests/test_beam.py."""
  from apache_beam.options.pipeline_options import PipelineOptions

  from jaxgpt.config import base_config
  overrides = dict(a.removeprefix('--config.').split('=', 1) for a in shlex.split(command.text) if '--config.' in a)
  config = base_config()
  for dotted in overrides:
    node = config
    for name in dotted.split('.'):
      node = node[name]  # KeyError: no such field
  args = shlex.split(overrides['data.beam_args'])
  known = PipelineOptions(args).get_all_options(drop_default=True)
  for arg in args:
    name = arg.removeprefix('--').split('=')[0]
    assert name in known or f'{name}s' in known, f'Beam does not know --{name}'
  assert known['runner'] in ('DataflowRunner', 'FlinkRunner', 'SparkRunner') and overrides['data.executor'] == 'beam'


def _sweep_rows(result, flow) -> None:
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert [r['variant'] for r in rows] == ['quickstart', 'lr-1e-2', 'width-192']
  minutes = float(result.command.split('--minutes ')[-1].split()[0])  # the last --minutes wins
  for row in rows:
    results = json.load(open(os.path.join(flow.directory, 'runs', 'sweep', row['variant'], 'results.json')))
    # Each variant trains for the steps its own measured speed allows in the time given (30 at least).
    assert row['steps'] == max(30, int(minutes * 60 / row['seconds_per_step'])) == results['step']
    assert row['bits_per_byte'] == results['bits_per_byte']  # the table reports each variant's own run
  # Each variant's overrides reached its run: the learning rate leaves the size alone, the width does not.
  quickstart, faster, wider = (row['params_M'] for row in rows)
  assert faster == quickstart < wider


def _lr_sweep_rows(result, flow) -> None:
  """Each variant's row is its own run's: its learning rate reached the run, its figures are the run's."""
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert sorted((r['variant'], r['optim.lr']) for r in rows) == [('lr=2e-2', '2e-2'), ('lr=3e-3', '3e-3')]
  for row in rows:
    run = os.path.join(flow.directory, 'runs', 'lr', row['variant'])
    results = json.load(open(os.path.join(run, 'results.json')))
    assert json.load(open(os.path.join(run, 'config.json')))['optim']['lr'] == float(row['optim.lr'])
    assert row['loss'] == results['loss'] and row['steps'] == results['step'] and results['epochs'] > 0
    assert {'best', 'stopped_early'} <= set(results)
  csv_lines = open(os.path.join(flow.directory, 'runs', 'lr', 'sweep.csv')).read().splitlines()
  assert [line.split(',')[0] for line in csv_lines] == ['variant', 'lr=3e-3', 'lr=2e-2']


def _compared(result, flow) -> None:
  report = os.path.join(flow.directory, 'runs', 'lr', 'report')
  assert {'runs.md', 'runs.csv', 'loss_vs_steps.png', 'loss_vs_tokens.png', 'loss_vs_time.png'} <= set(
      os.listdir(report))
  assert '| lr=3e-3 |' in result.stdout and '| lr=2e-2 |' in result.stdout


def _cost_the_page_shows(result, flow) -> None:
  """The time, device-hours and cost in the page's table are what the command prints."""
  found = re.search(r'TFLOP/s:\s+(.+?) \((\S+) device-hours\), (\$[\d,]+) at', result.stdout)
  page = open(os.path.join(REPO, 'docs', 'experiments.md')).read()
  assert found and all(f'| {figure} |' in page for figure in found.groups()), found


def _exported(directory: str):
  def expect(result, flow):
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(
        os.listdir(os.path.expanduser(directory))), os.listdir(os.path.expanduser(directory))
  return expect


def _preference_tuned(result, flow) -> None:
  assert re.search(r'preference accuracy [\d.]+% \| reward margin \S+ \| DPO loss \S+ \| KL estimate \S+ '
                   r'\(\d+ held-out pairs\)', result.stdout), result.stdout[-2000:]


def _hub_login_command_exists(command, flow) -> None:
  result = subprocess.run([*shlex.split(command.text), '--help'], env={**os.environ, 'HF_HUB_OFFLINE': '1'},
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and '--token' in result.stdout, result.stderr[-2000:]


def _push_exports_then_reports_the_upload(command, flow) -> None:
  """Run as written, offline with a token: the export completes (its card under --license), then the upload
  fails in one line that says the folder is complete."""
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'HOME': flow.home, 'HF_HUB_OFFLINE': '1',
         'HF_TOKEN': 'hf_offline', 'PATH': f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}'}
  result = subprocess.run(shlex.split(command.text), cwd=flow.directory, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 2 and 'exported folder is complete' in result.stderr, result.stderr[-2000:]
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  card = open(os.path.join(flow.home, 'models', 'gpt2-sft', 'README.md')).read()
  assert card.startswith('---\nlicense: "mit"\n') and 'machine-generated' in card, card[:500]


def _task_evaluated(run: str, task: str, examples: int):
  """The labels the page shows; the task's results and a sample per completion in the run's eval/step_3/TASK/."""
  def expect(result, flow):
    _labels_the_page_shows(result, flow)
    directory = os.path.join(flow.directory, 'runs', run, 'eval', 'step_3', task)
    results = json.load(open(os.path.join(directory, 'results.json')))
    assert results['task'] == task and results['examples'] == examples, results
    samples = open(os.path.join(directory, 'samples.jsonl')).read().splitlines()
    assert len(samples) == examples * results.get('samples_per_problem', 1)
  return expect


def _loads_in_transformers(result, flow) -> None:
  assert result.stdout.split()[-2:] == ['GPT2LMHeadModel', 'True'], result.stdout


def _sharding_rule_overridden(result, flow) -> None:
  assert json.loads(result.stdout) == {'vocab': None, 'act_vocab': None, 'embed': 'fsdp'}, result.stdout


def _local_tasks_scored(result, flow) -> None:
  """Both of the page's tasks, offline, on every document, with the metrics the page shows, written to a file."""
  assert '(local files: offline)' in result.stdout
  _labels_the_page_shows(result, flow)
  found = json.load(open(os.path.join(flow.directory, 'runs', 'tiny', 'eval', 'step_10',
                                      'harness_code_choice+code_line.json')))
  assert set(found['results']['code_choice']) >= {'acc,none', 'acc_norm,none'}
  assert {k: v['effective'] for k, v in found['n-samples'].items()} == {'code_choice': 4, 'code_line': 2}


def _standard_tasks_known(command, flow) -> None:
  """lm-eval has each task named, of the kind the page says; the run is the one docs/finetuning.md imports."""
  import lm_eval
  from jaxgpt.eval.harness import local_task_configs
  tasks = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks')
  configs = {name: config for folder in ('hellaswag', 'arc', 'lambada')
             for name, config in local_task_configs(os.path.join(tasks, folder)).items()}
  named = re.search(r'--tasks (\S+)', command.text).group(1).split(',')
  assert {name: configs[name]['output_type'] for name in named} == {
      'hellaswag': 'multiple_choice', 'arc_easy': 'multiple_choice', 'arc_challenge': 'multiple_choice',
      'lambada_openai': 'loglikelihood'}
  assert '--workdir=runs/gpt2' in _page_command('docs/finetuning.md', r'jaxgpt\.convert --import_hf')


def _blind_sheet_written(result, flow) -> None:
  sheet = open(os.path.join(flow.directory, 'ab', 'sheet.csv')).read()
  key = json.load(open(os.path.join(flow.directory, 'ab', 'key.json')))
  assert sheet.startswith('id,prompt,output_1,output_2,preference\n1,import ,') and 'runs/' not in sheet
  assert key['runs'] == ['runs/quickstart', 'runs/mine_jsonl'] and sorted(key['rows']) == ['1', '2']


def _unjudged_sheet_refused(result, flow) -> None:
  """Nobody has filled in the sandbox's sheet, so the tally says so (the page shows a filled-in one)."""
  assert 'error: no row of ab/sheet.csv is judged yet' in result.stderr, result.stderr[-1000:]


# The page's Python block that writes its task files; too long to spell here, so looked up by its beginning.
EVALUATION_TASK_FILES = ' '.join(_page_command('docs/evaluation.md', r"^from pathlib import Path\s+tasks = ").split())


TABLE = {
    'README.md': {
        'pip install -e .': NotHere(
            'installs into the shared environment, and fetches its build backend from the package index',
            _this_checkout_installed_editable),
        'python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart': Run(
            append(QUICKSTART_TINY), expect=_quickstart_trained),
        "pip install -e '.[test]'": NotHere('needs the package index', _this_checkout_installed_editable),
        'pytest': NotHere('the suite this test is part of', _pytest_collects_this_suite),
        'python -m jaxgpt.sample --workdir runs/quickstart --prompt "def fibonacci(" --temperature 0.5': Run(
            expect=sampled('def fibonacci(', step=10)),
        'python -m jaxgpt.evaluate --workdir runs/tiny --references refs.jsonl --max_new_tokens 16': Run(
            expect=_evaluated_with_references),
        'python -m jaxgpt.sample --workdir runs/tiny --prompt "def main(" --max_new_tokens 24 --temperature 0.5': Run(
            expect=sampled('def main(', step=10)),
        'python -m jaxgpt.serve --workdir runs/tiny --port 8765': Serve(),
        'curl -s localhost:8765/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "import ", '
        '"max_tokens": 12, "temperature": 0.7, "seed": 1}\'': Request(expect=_completion_like_the_page),
        'curl -s localhost:8765/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "import ", '
        '"max_tokens": 500}\'': Request(expect=_error_the_page_shows),
        "python -m jaxgpt.train --config configs/quickstart.py --workdir runs/mine_dir --config.data.source=dir "
        "--config.data.path=~/my_texts --config.data.glob='**/*.md'": Run(append(QUICKSTART_TINY)),
        'python -m jaxgpt.train --config configs/quickstart.py --workdir runs/mine_jsonl --config.data.source=jsonl '
        '--config.data.path=corpus.jsonl --config.data.text_field=text': Run(append(QUICKSTART_TINY)),
        "python tools/plan.py --config configs/llama_1b.py --devices 16 --device 'TPU v5e'": Run(
            expect=_plan_fits('TPU v5e')),
        'python -m jaxgpt.train --config configs/llama_1b.py --workdir gs://my-bucket/runs/llama1b '
        '--config.data.path=gs://my-bucket/data/corpus.jsonl --config.data.cache_dir=gs://my-bucket/cache': NotHere(
            'trains in a Cloud Storage bucket; docs/tpu.md\'s training command, which runs here with local paths',
            _as_the_tpu_page_runs_it(r'^~/venv/bin/python -m jaxgpt\.train')),
        'python -m jaxgpt.sample --workdir gs://my-bucket/runs/llama1b --prompt "The meaning of life is"': NotHere(
            'reads a run in a Cloud Storage bucket; docs/tpu.md\'s sample command, which runs here with local paths',
            _as_the_tpu_page_runs_it(r'^~/venv/bin/python -m jaxgpt\.sample')),
    },
    'docs/serving.md': {
        'python -m jaxgpt.serve --workdir runs/tiny --port 8765 --audit_log ~/jaxgpt-audit.jsonl '
        '--blocked_words=zorblax': Serve(),
        "from openai import OpenAI client = OpenAI(base_url='http://localhost:8765/v1', api_key='unused') # or the "
        "server's key (JAXGPT_API_KEY) completion = client.completions.create(model='tiny', prompt=['def ', 'import "
        "'], n=2, max_tokens=16, logprobs=2, seed=1) for choice in completion.choices: # prompt 0's two choices, then "
        "prompt 1's print(choice.index, repr(choice.text), choice.logprobs.token_logprobs[:3]) reply = "
        "client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Write a loop'}], "
        'max_tokens=16) print(reply.choices[0].message.content) for chunk in '
        "client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Write a loop'}], "
        "max_tokens=16, stream=True): print(chunk.choices[0].delta.content or '', end='', flush=True) print()":
            SnippetRequest(expect=_openai_client_answered),
        'curl -s localhost:8765/v1/chat/completions -H \'Content-Type: application/json\' -d \'{"model": "tiny", '
        '"messages": [{"role": "user", "content": "Write a loop"}], "max_tokens": 12, "seed": 1}\'':
            Request(expect=_json_like_the_page),
        'curl -s localhost:8765/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "def ", '
        '"frequency_penalty": 0.5}\'': Request(expect=_error_the_page_shows),
        'curl -s localhost:8765/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "def zorblax(", '
        '"max_tokens": 8, "user": "alice"}\'': Request(expect=_json_like_the_page),
        'tail -1 ~/jaxgpt-audit.jsonl': Request(expect=_json_like_the_page),
        "curl -s localhost:8765/metrics | grep -E '^jaxgpt_(requests_total|safety_flags_total)'":
            Request(expect=_metrics_like_the_page),
    },
    'docs/evaluation.md': {
        "pip install -e '.[harness]'": NotHere('needs the package index', _this_checkout_installed_editable),
        EVALUATION_TASK_FILES: Snippet(),
        'python -m jaxgpt.evaluate --tasks code_choice,code_line --task_dir my_tasks --workdir runs/tiny': Run(
            expect=_local_tasks_scored),
        'python -m jaxgpt.evaluate --tasks hellaswag,arc_easy,arc_challenge,lambada_openai --workdir runs/gpt2 '
        '--batch_size 32': NotHere('downloads the tasks\' datasets from the Hugging Face Hub', _standard_tasks_known),
        'python -m jaxgpt.evaluate --compare runs/quickstart runs/mine_jsonl --prompts refs.jsonl --temperature 0.7 '
        '--max_new_tokens 16 --out ab': Run(expect=_blind_sheet_written),
        'python -m jaxgpt.evaluate --tally ab/sheet.csv --key ab/key.json': Run(exit_code=2,
                                                                                expect=_unjudged_sheet_refused),
    },
    'docs/data.md': {
        'python -m jaxgpt.prepare --config configs/quickstart.py': Run(append(STDLIB_DATA), expect=_prepared(True)),
        'python -m jaxgpt.prepare --config configs/web_text.py --config.data.path=~/crawl': Run(
            append(PROSE_DATA), expect=_prepared(False)),
        'python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=jsonl '
        '--config.data.path=chat.jsonl --config.data.instruction_field=prompt --config.data.response_field=answer': Run(
            append(PROSE_DATA), expect=_prepared(False)),
        'python tools/near_dup_recall.py': Run(NEAR_DUP_FEW),
        'python tools/near_dup_recall.py --quickstart': Run(NEAR_DUP_FEW),
        # The corpus sources: tests/corpora.py writes the docs' paragraphs in each format into the sandbox.
        "python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=jsonl "
        "--config.data.path='shards/*.jsonl.gz,shards/*.jsonl.zst'": Run(
            append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()))),
        'python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=jsonl '
        '--config.data.path=forum.jsonl --config.data.filter_field=score --config.data.filter_min=3 '
        '--config.data.languages="(\'en\',)"': Run(
            append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()) + 1, 'filtered', 'language')),
        "python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=parquet "
        "--config.data.path='fineweb/*.parquet'": Run(append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()))),
        'python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=arrow '
        '--config.data.path=hf_dataset': Run(append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()))),
        'python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=warc --config.data.path=warc': Run(
            append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()))),
        'python -m jaxgpt.prepare --config configs/quickstart.py --config.data.source=wikipedia '
        '--config.data.path=enwiki-latest-pages-articles.xml.bz2': Run(
            append(PROSE_DATA), expect=_prepared_all(len(_paragraphs()))),
        'python -m jaxgpt.train --config configs/mixture.py --workdir runs/mixture': Run(
            append({**QUICKSTART_TINY, 'train.eval_batches': 1}), expect=_mixture_shares_logged),
        "python -m jaxgpt.prepare --config configs/quickstart.py --config.data.executor=beam --config.data.beam_args="
        "'--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2'": Run(
            append({**STDLIB_DATA, 'data.cache_dir': '~/.cache/jaxgpt-beam'}), expect=_prepared_as_locally),
        "python -m jaxgpt.prepare --config configs/web_text.py --config.data.source=jsonl "
        "--config.data.path=gs://my-bucket/data/corpus.jsonl --config.data.cache_dir=gs://my-bucket/cache "
        "--config.data.executor=beam --config.data.beam_args='--runner=DataflowRunner --project=my-project "
        "--region=us-central1 --temp_location=gs://my-bucket/beam-tmp "
        "--extra_package=dist/jaxgpt-0.1.0-py3-none-any.whl'": NotHere(
            'runs on Google Cloud Dataflow', _beam_cluster_command_parses),
        "python -m jaxgpt.prepare --config configs/web_text.py --config.data.path=/shared/crawl "
        "--config.data.cache_dir=/shared/cache --config.data.executor=beam "
        "--config.data.beam_args='--runner=FlinkRunner --flink_master=flink-master:8081 "
        "--environment_type=DOCKER --environment_config=my-registry/jaxgpt-beam:latest "
        "--temp_location=/shared/beam-tmp'": NotHere('runs on a Flink cluster', _beam_cluster_command_parses),
        "python -m jaxgpt.prepare --config configs/web_text.py --config.data.path=/shared/crawl "
        "--config.data.cache_dir=/shared/cache --config.data.executor=beam "
        "--config.data.beam_args='--runner=SparkRunner "
        "--spark_master_url=spark://spark-master:7077 --environment_type=DOCKER "
        "--environment_config=my-registry/jaxgpt-beam:latest --temp_location=/shared/beam-tmp'": NotHere(
            'runs on a Spark cluster', _beam_cluster_command_parses),
    },
    'docs/recipes.md': {
        'python -m jaxgpt.train --config configs/chat.py:small --workdir runs/chat --config.init_from=~/models/gpt2':
            Run(append(FINETUNE_TINY)),
        'python -m jaxgpt.evaluate --workdir runs/chat': Run(expect=_labels_the_page_shows),
        'python -m jaxgpt.train --config configs/content.py:small --workdir runs/content '
        '--config.init_from=~/models/gpt2': Run(append(FINETUNE_TINY)),
        'python -m jaxgpt.evaluate --workdir runs/content': Run(expect=_labels_the_page_shows),
        # The task recipes' sample prompts do not fit the tiny context; their answers are 8 tokens at most.
        'python -m jaxgpt.train --config configs/codegen.py:small --workdir runs/code --config.init_from=~/models/gpt2':
            Run(append({**FINETUNE_TINY, 'sample.prompts': '()', 'data.max_docs': 10})),
        'python -m jaxgpt.evaluate --task code --workdir runs/code --data examples/code/problems.jsonl '
        '--num_samples 10 --pass_k 1,5 --temperature 0.8': Run('--max_new_tokens 8',
                                                               expect=_task_evaluated('code', 'code', 6)),
        'python -m jaxgpt.train --config configs/summarization.py:small --workdir runs/summarization '
        '--config.init_from=~/models/gpt2': Run(append({**FINETUNE_TINY, 'sample.prompts': '()'})),
        'python -m jaxgpt.evaluate --task summarization --workdir runs/summarization '
        '--data examples/summarization/test.jsonl': Run('--max_new_tokens 8',
                                                        expect=_task_evaluated('summarization', 'summarization', 6)),
        'python -m jaxgpt.train --config configs/qa.py:small --workdir runs/qa --config.init_from=~/models/gpt2': Run(
            append({**FINETUNE_TINY, 'sample.prompts': '()'})),
        'python -m jaxgpt.evaluate --task qa --workdir runs/qa --data examples/qa/test.jsonl': Run(
            '--max_new_tokens 8', expect=_task_evaluated('qa', 'qa', 8)),
        'python -m jaxgpt.train --config configs/sentiment.py:small --workdir runs/sentiment '
        '--config.init_from=~/models/gpt2': Run(append({**FINETUNE_TINY, 'sample.prompts': '()'})),
        'python -m jaxgpt.evaluate --task sentiment --workdir runs/sentiment --data examples/sentiment/test.jsonl':
            Run(expect=_task_evaluated('sentiment', 'sentiment', 8)),
    },
    'docs/finetuning.md': {
        'pip install -U huggingface_hub': NotHere('needs the package index', _hub_cli_installed),
        'hf download gpt2 config.json model.safetensors tokenizer.json vocab.json merges.txt '
        '--local-dir ~/models/gpt2': NotHere(
            'downloads from the Hugging Face Hub; ~/models/gpt2 here is a tiny random GPT-2 (tests/hf_models.py)',
            _download_fetches_what_jaxgpt_reads),
        'python -m jaxgpt.convert --import_hf=~/models/gpt2 --workdir=runs/gpt2': Run(),
        'python -m jaxgpt.sample --workdir runs/gpt2 --prompt "The meaning of life is" --temperature 0.7': Run(
            expect=sampled('The meaning of life is', step=0)),
        'python -m jaxgpt.train --config configs/finetune_gpt2.py:small --workdir runs/ft '
        '--config.init_from=~/models/gpt2 --config.data.path=my_text.jsonl': Run(append(FINETUNE_TINY)),
        'python -m jaxgpt.train --config configs/sft_alpaca.py:small --workdir runs/sft '
        '--config.init_from=~/models/gpt2 --config.data.path=alpaca.jsonl': Run(append(FINETUNE_TINY)),
        'python -m jaxgpt.convert --workdir=runs/sft --export_hf=~/models/gpt2-sft': Run(
            expect=_exported('~/models/gpt2-sft')),
        "import os from transformers import AutoModelForCausalLM, AutoTokenizer path = "
        "os.path.expanduser('~/models/gpt2-sft') # from_pretrained does not expand ~ model = "
        "AutoModelForCausalLM.from_pretrained(path) # GPT2LMHeadModel tokenizer = AutoTokenizer.from_pretrained(path)":
            Snippet(after="\nprint(type(model).__name__, bool(tokenizer('The quick')['input_ids']))",
                    expect=_loads_in_transformers),
        'python -m jaxgpt.train --config configs/lora.py:small --workdir runs/lora --config.init_from=~/models/gpt2 '
        '--config.data.path=my_text.jsonl': Run(append(FINETUNE_TINY)),
        'python -m jaxgpt.train --config configs/dpo.py:small --workdir runs/dpo --config.init_from=runs/sft '
        '--config.data.path=prefs.jsonl': Run(append(FINETUNE_TINY), expect=_preference_tuned),
        'python -m jaxgpt.sample --workdir runs/lora --prompt "The meaning of life is"': Run(
            expect=sampled('The meaning of life is', step=3)),
        'python -m jaxgpt.convert --workdir=runs/lora --export_hf=~/models/gpt2-lora': Run(
            expect=_exported('~/models/gpt2-lora')),
        "pip install -e '.[hub]'": NotHere('needs the package index', _this_checkout_installed_editable),
        'hf auth login': NotHere('asks for a Hugging Face token and stores it', _hub_login_command_exists),
        'python -m jaxgpt.convert --workdir=runs/sft --export_hf=~/models/gpt2-sft --license=mit '
        '--push_to_hub=my-name/gpt2-sft': NotHere('uploads to the Hugging Face Hub',
                                                  _push_exports_then_reports_the_upload),
    },
    'docs/gpu.md': {
        'pip install -e . "jax[cuda12]"': NotHere('CUDA wheels, for a machine with NVIDIA GPUs', _jax_within_the_pin),
        'python tools/plan.py --config configs/gpt2.py:medium --devices 8 --device H100': Run(
            expect=_plan_fits('H100')),
        'python -m jaxgpt.train --config configs/gpt2.py:medium --workdir /shared/runs/gpt2-medium '
        '--config.data.source=jsonl --config.data.path=/shared/data/corpus.jsonl': Run(
            append(GPT2_TINY, '--workdir=runs/gpt2-medium', *ON_THIS_MACHINE)),
        'source ~/venv/bin/activate': Run(),
        'cd ~/jaxgpt': Run(),
        'srun python -m jaxgpt.train --config configs/llama_1b.py --workdir /shared/runs/llama1b '
        '--config.distributed.auto=True --config.optim.grad_accum_steps=8 --config.data.source=jsonl '
        '--config.data.path=/shared/data/corpus.jsonl --config.data.cache_dir=/shared/cache':
            NotHere('a SLURM job on 4 GPU nodes', _sbatch_nodes_match_the_mesh),
        # One process with the 32 devices of the job (4 nodes x 8 GPUs) as fake CPU devices: one slice here, so
        # mesh.data=4 stands for the 4 hosts (mesh.dcn_data there) and the mesh is the job's 4 x 8.
        'python -m jaxgpt.train --config configs/llama_1b.py --workdir /shared/runs/llama1b '
        '--config.distributed.auto=True --config.optim.grad_accum_steps=8 --config.data.source=jsonl '
        '--config.data.path=/shared/data/corpus.jsonl --config.data.cache_dir=/shared/cache':
            Run(append(LLAMA_1B_TINY, '--workdir=runs/llama1b-srun', '--config.mesh.data=4', *ON_THIS_MACHINE),
                env=(('XLA_FLAGS', '--xla_force_host_platform_device_count=32'),)),
        'python -m jaxgpt.train --config configs/llama_1b.py --workdir /shared/runs/llama1b '
        '--config.distributed.coordinator_address=10.0.0.1:1234 --config.distributed.num_processes=4 '
        '--config.distributed.process_id=$NODE_RANK --config.optim.grad_accum_steps=8 --config.data.source=jsonl '
        '--config.data.path=/shared/data/corpus.jsonl --config.data.cache_dir=/shared/cache': NotHere(
            'four nodes that reach a coordinator at 10.0.0.1 (tests/test_multihost.py runs two processes on one host)',
            _several_nodes_config_is_valid),
    },
    'docs/performance.md': {
        'python tools/bench.py --preset mid --preset tiny': Run(BENCH_ON_A_TINY_CONFIG),
        'python tools/bench.py --sweep depth': NotHere(
            'compiles 12 and 48 layers, scanned and unrolled: about a minute of CPU, more than the suite can spend, '
            'and tools/bench.py has no flag for smaller depths', _depth_sweep_compiles),
        'python tools/bench.py --preset mid --sweep remat --steps 5 --rounds 2': Run(BENCH_ON_A_TINY_CONFIG),
        'python tools/bench.py --preset small --sweep remat': Run(BENCH_ON_A_TINY_CONFIG),
        # README's run again: it resumes at step 10 and goes on to 20.
        'python -m jaxgpt.train --config configs/quickstart.py --workdir runs/quickstart': Run(
            append({**QUICKSTART_TINY, 'train.num_steps': 20}), expect=_quickstart_resumed),
        "python tools/sweep.py --config configs/quickstart.py --minutes 5 --workdir runs/sweep --variant 'quickstart:' "
        "--variant 'lr-1e-2:optim.lr=1e-2' --variant 'width-192:model.embed_dim=192,model.mlp_dim=512'": Run(
            append({**QUICKSTART_TINY, 'train.eval_every': 30, 'train.checkpoint_every': 30, 'sample.prompts': '()'},
                   '--minutes', '0.001'),
            expect=_sweep_rows),
        # The quickstart flow's tiny run, served; no tokenizer trained for a random one.
        'python tools/bench_decode.py --clients 50': Run('--batches 1 --new_tokens 4 --rounds 1 --clients 2 '
                                                         '--requests 1 --max_tokens 4 --workdir runs/quickstart'),
        'python tools/bench_data.py --mb 8': Run('--small'),
    },
    'docs/experiments.md': {
        # The quickstart at its tiny size: 0.005 epochs of the tiny split are 8 steps, validated every 2.
        'python tools/sweep.py --config configs/quickstart.py --workdir runs/lr --sweep optim.lr=3e-3,2e-2 '
        '--config.train.num_epochs=0.1 --config.train.eval_every=50 --config.train.keep_best=True '
        '--config.train.early_stopping_patience=3': Run(
            append({**QUICKSTART_TINY, 'train.num_epochs': 0.005, 'train.eval_every': 2, 'sample.prompts': '()'},
                   '--parallel', '2'),
            expect=_lr_sweep_rows),
        'python -m jaxgpt.compare runs/lr/lr=3e-3 runs/lr/lr=2e-2 --out runs/lr/report': Run(expect=_compared),
        'python tools/plan.py --config configs/gpt2.py:small --devices 1 --device H100': Run(
            expect=_cost_the_page_shows),
        'python tools/plan.py --config configs/gpt2.py:small --devices 8 --device H100 --config.model.num_layers=28 '
        '--config.model.num_heads=16 --config.model.embed_dim=4096 --config.model.mlp_dim=16384 '
        '--config.model.tie_embeddings=False --config.seq_len=2048 --config.model.max_len=2048 '
        '--config.optim.grad_accum_steps=16': Run(expect=_cost_the_page_shows),
        "python tools/plan.py --config configs/gpt2.py:small --devices 512 --device 'TPU v5p' --tokens 300e9 "
        '--config.model.num_layers=96 --config.model.num_heads=96 --config.model.embed_dim=12288 '
        '--config.model.mlp_dim=49152 --config.seq_len=2048 --config.model.max_len=2048 --config.batch_size=1536 '
        '--config.optim.grad_accum_steps=3': Run(expect=_cost_the_page_shows),
    },
    'docs/sharding.md': {
        "c.mesh.rules = (('vocab', None), ('act_vocab', None))": Snippet(
            before='from configs import quickstart\nc = quickstart.get_config()\n',
            after='\nimport json\nfrom jaxgpt import sharding\nrules = dict(sharding.logical_rules(c.mesh))\n'
                  "print(json.dumps({name: rules[name] for name in ('vocab', 'act_vocab', 'embed')}))",
            expect=_sharding_rule_overridden),
    },
    'docs/storage.md': {
        'python -m jaxgpt.train --config configs/quickstart.py --workdir gs://my-bucket/runs/quickstart '
        '--config.data.cache_dir=gs://my-bucket/cache --config.train.compilation_cache_dir=gs://my-bucket/xla': NotHere(
            'trains in a Cloud Storage bucket; tests/test_storage.py trains so in an emulated one',
            _storage_test_trains_so),
        'python -m pytest -q tests/test_storage.py': NotHere('part of the suite this test is part of',
                                                             _pytest_collects_this_suite),
    },
    'docs/tpu.md': {
        'export PROJECT=my-project ZONE=us-west4-a TPU=jaxgpt-v5e TYPE=v5litepod-16': NotHere(
            'sets the variables of the Cloud commands below', _exports_set_the_later_variables),
        'gcloud storage buckets create gs://my-bucket --project=$PROJECT --location=us-west4': NotHere(
            'creates a Cloud Storage bucket', _bucket_in_the_zones_region),
        'gcloud storage cp corpus.jsonl gs://my-bucket/data/corpus.jsonl': NotHere(
            'writes to Cloud Storage', _copied_where_training_reads),
        'gcloud compute tpus queued-resources create $TPU --node-id=$TPU --project=$PROJECT --zone=$ZONE '
        '--accelerator-type=$TYPE --runtime-version=v2-alpha-tpuv5-lite --spot': NotHere(
            'requests a Cloud TPU slice', _slice_is_the_planned_device_count),
        'gcloud compute tpus queued-resources describe $TPU --project=$PROJECT --zone=$ZONE': NotHere(
            'asks Cloud TPU for the request\'s state', _same_resource),
        'gcloud compute tpus tpu-vm scp --recurse ~/jaxgpt $TPU:~ --project=$PROJECT --zone=$ZONE --worker=all': NotHere(
            'copies to Cloud TPU VMs', _code_copied_where_it_is_installed),
        'gcloud compute tpus tpu-vm ssh $TPU --project=$PROJECT --zone=$ZONE --worker=all --command=\' curl -LsSf '
        'https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv venv --python 3.12 ~/venv && cd ~/jaxgpt && '
        '~/.local/bin/uv pip install --python ~/venv/bin/python -e . "jax[tpu]"\'': NotHere(
            'installs on Cloud TPU VMs, from the network', _python_that_jaxgpt_supports),
        "gcloud compute tpus tpu-vm ssh $TPU --project=$PROJECT --zone=$ZONE --worker=0 --command=' cd ~/jaxgpt && "
        "~/venv/bin/python -m jaxgpt.prepare --config configs/llama_1b.py \\ "
        "--config.data.path=gs://my-bucket/data/corpus.jsonl --config.data.cache_dir=gs://my-bucket/cache'": NotHere(
            'runs on a Cloud TPU VM; its jaxgpt command runs here as the next entry', _training_reuses_the_prepared_data),
        # The commands on the VMs run here with the bucket's paths replaced by local ones (a later flag wins).
        '~/venv/bin/python -m jaxgpt.prepare --config configs/llama_1b.py '
        '--config.data.path=gs://my-bucket/data/corpus.jsonl --config.data.cache_dir=gs://my-bucket/cache': Run(
            append({k: v for k, v in LLAMA_1B_TINY.items() if k.startswith('data.')}, *ON_THIS_MACHINE),
            expect=_prepared_somewhere),
        "python tools/plan.py --config configs/llama_1b.py --devices 16 --infer_devices 8 --device 'TPU v5e'": Run(
            expect=_plan_fits_to_train_and_serve('TPU v5e', serving_devices=8)),
        "gcloud compute tpus tpu-vm ssh $TPU --project=$PROJECT --zone=$ZONE --worker=all --command=' cd ~/jaxgpt && "
        "~/venv/bin/python -m jaxgpt.train --config configs/llama_1b.py \\ --workdir gs://my-bucket/runs/llama1b "
        "--config.distributed.auto=True \\ --config.data.path=gs://my-bucket/data/corpus.jsonl "
        "--config.data.cache_dir=gs://my-bucket/cache \\ 2>&1 | tee ~/train.log'": NotHere(
            'runs on Cloud TPU VMs; its jaxgpt command runs here as the next entry'),
        '~/venv/bin/python -m jaxgpt.train --config configs/llama_1b.py --workdir gs://my-bucket/runs/llama1b '
        '--config.distributed.auto=True --config.data.path=gs://my-bucket/data/corpus.jsonl '
        '--config.data.cache_dir=gs://my-bucket/cache 2>&1 | tee ~/train.log': Run(
            append(LLAMA_1B_TINY, '--workdir=runs/llama1b', *ON_THIS_MACHINE), expect=_reused_prepared_data),
        'gcloud compute tpus queued-resources delete $TPU --project=$PROJECT --zone=$ZONE --force --quiet': NotHere(
            'deletes a Cloud TPU request', _same_resource),
        'export TPU=jaxgpt-serve TYPE=v5litepod-8': NotHere(
            'sets the variables of the Cloud commands for the serving VM', _serving_slice_is_one_vm),
        "gcloud compute tpus tpu-vm ssh $TPU --project=$PROJECT --zone=$ZONE --command=' cd ~/jaxgpt && "
        "~/venv/bin/python -m jaxgpt.sample --workdir gs://my-bucket/runs/llama1b \\ --prompt \"The meaning of life "
        "is\" && ~/venv/bin/python -m jaxgpt.evaluate --workdir gs://my-bucket/runs/llama1b'": NotHere(
            'runs on a Cloud TPU VM; its jaxgpt commands run here as the next entries', _inference_reads_the_trained_run),
        '~/venv/bin/python -m jaxgpt.sample --workdir gs://my-bucket/runs/llama1b --prompt "The meaning of life is"': Run(
            append({}, '--workdir=runs/llama1b'), expect=sampled('The meaning of life is', step=2)),
        '~/venv/bin/python -m jaxgpt.evaluate --workdir gs://my-bucket/runs/llama1b': Run(
            append({}, '--workdir=runs/llama1b')),
        "gcloud compute tpus tpu-vm ssh $TPU --project=$PROJECT --zone=$ZONE --command=' cd ~/jaxgpt && "
        "~/venv/bin/python -m jaxgpt.serve --workdir gs://my-bucket/runs/llama1b --port 8000' -- -L "
        "8000:localhost:8000": NotHere('runs on a Cloud TPU VM; its jaxgpt command runs here as the next entry',
                                       _port_forwarded_to_the_server),
        '~/venv/bin/python -m jaxgpt.serve --workdir gs://my-bucket/runs/llama1b --port 8000': Serve(
            append({}, '--workdir=runs/llama1b')),
        'curl -s localhost:8000/v1/completions -H \'Content-Type: application/json\' -d \'{"prompt": "The meaning of '
        'life is", "max_tokens": 32}\'': Request(expect=_completion_within(32)),
        'python tools/plan.py --config configs/llama_1b.py --devices 64 --slices 4 --config.optim.grad_accum_steps=4':
            Run(expect=_plan_across_slices("{'data': 4, 'fsdp': 16, 'tensor': 1} on 64 devices (4 slices)")),
    },
}


# --- the tests ----------------------------------------------------------------------------------


def test_commands_are_read_as_a_shell_reads_them():
  page = '\n'.join([
      'Text with `inline code`.', '```bash', '# a comment line', 'python -m jaxgpt.train --config c.py \\',
      "    --config.data.glob='**/*.md'   # trailing comment", 'pip install -e . && pytest', '```',
      '```', '$ python -m jaxgpt.sample --workdir run \\', '    --prompt "a # b"', '# step 3 of run', 'output line',
      '$ curl -s localhost:1/x -d \'{"a": 1}\'', '{"error": 1}', '```',
      '```bash', "gcloud ssh vm --command='", '  cd jaxgpt && python -m jaxgpt.train --config c.py \\',
      "    --workdir w 2>&1 | tee log' && echo ${A#gs://}", 'srun python tools/plan.py --devices 2', '```',
      '```', 'not a command: an output block', '```', '```python', 'x = 1', '```'])
  commands = commands_in('p.md', page)
  assert [(c.line, c.key) for c in commands] == [
      (4, "python -m jaxgpt.train --config c.py --config.data.glob='**/*.md'"), (6, 'pip install -e .'),
      (6, 'pytest'), (9, 'python -m jaxgpt.sample --workdir run --prompt "a # b"'),
      (13, 'curl -s localhost:1/x -d \'{"a": 1}\''),
      (17, "gcloud ssh vm --command=' cd jaxgpt && python -m jaxgpt.train --config c.py \\ --workdir w 2>&1 | tee "
           "log'"),
      (17, 'python -m jaxgpt.train --config c.py --workdir w 2>&1 | tee log'), (19, 'echo ${A#gs://}'),
      (20, 'srun python tools/plan.py --devices 2'), (20, 'python tools/plan.py --devices 2'), (26, 'x = 1')]
  assert commands[3].shown_output == '# step 3 of run\noutput line' and commands[4].shown_output == '{"error": 1}'
  assert commands[6].inside.startswith('gcloud ssh vm')
  assert Run('--x=1').command('python a.py 2>&1 | tee log') == 'python a.py --x=1 2>&1 | tee log'


def test_every_doc_command_is_in_the_table_and_every_entry_in_the_docs():
  in_docs = {(c.page, c.key) for c in doc_commands()}
  in_table = {(page, key) for page, entries in TABLE.items() for key in entries}
  assert not in_docs - in_table, 'commands in the docs that TABLE does not say how to run:\n' + '\n'.join(
      f'  {page}: {key!r}' for page, key in sorted(in_docs - in_table))
  assert not in_table - in_docs, 'TABLE entries whose command is no longer in the docs:\n' + '\n'.join(
      f'  {page}: {key!r}' for page, key in sorted(in_table - in_docs))
  assert {page for page, _ in in_docs} == {page for pages in FLOWS.values() for page in pages}


@pytest.mark.parametrize('page', [page for pages in FLOWS.values() for page in pages])
def test_every_command_of_the_page_runs_as_written(page, command_runs):
  flow_name = next(name for name, pages in FLOWS.items() if page in pages)
  flow = command_runs.flow(flow_name)
  steps = [s for s in flow.steps if s.command and s.command.page == page]
  assert steps
  failures = [f for f in (check_step(flow, s) for s in steps) if f]
  assert not failures, f'{len(failures)} of {len(steps)} commands of {page} failed:\n\n' + '\n\n'.join(failures)
