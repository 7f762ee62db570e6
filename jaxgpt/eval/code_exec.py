"""Running generated programs, each in its own process with a time and a memory limit.

A model's completion may loop forever, allocate without end, exit early or kill its own
process; none of that may reach the evaluating process or another completion. Each program
runs as `python -I` in a new session (its own process group) and an empty temporary directory,
under limits the child sets on itself before the program starts: RLIMIT_AS (memory), RLIMIT_CPU
and RLIMIT_FSIZE (its output and any file it writes). At the wall-clock limit its whole process
group is killed. It passes only by running to its end, where the launcher prints a nonce the
program never sees: `sys.exit(0)` or `os._exit(0)` before the tests finish is a failure.

This guards against a model's accidents, not against malice: the program runs as this user, with
this user's files and network. Evaluate a model you do not trust in a container or VM.
"""

import concurrent.futures
import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

# Runs in the child: limits first, then the program in a fresh namespace; the nonce stays a local.
_LAUNCHER = '''
import resource, sys
def launch(memory, seconds, output, nonce):
  for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, output), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
  resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
  with open('program.py') as f:
    code = compile(f.read(), 'program.py', 'exec')
  sys.argv = ['program.py']
  exec(code, {'__name__': '__main__', '__builtins__': __builtins__})
  sys.stdout.write('\\n' + nonce + '\\n')
  sys.stdout.flush()
launch(*map(int, sys.argv[1:4]), sys.argv[4])
'''
_MESSAGE_BYTES = 2000  # the end of stderr kept to say why a program failed


@dataclasses.dataclass(frozen=True)
class Limits:
  seconds: float = 5.0  # wall clock, start-up included
  memory_mb: int = 512  # address space (RLIMIT_AS), the interpreter's own included
  output_mb: int = 16  # stdout, stderr and each file the program writes


@dataclasses.dataclass(frozen=True)
class Outcome:
  passed: bool
  result: str  # 'passed', or why not: 'timed out after 5 s', 'AssertionError', 'killed by SIGKILL', ...


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs Python `source` in a separate, limited process; passed when it runs to its end."""
  nonce = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix='jaxgpt-exec-', ignore_cleanup_errors=True) as directory:
    with open(os.path.join(directory, 'program.py'), 'w') as f:
      f.write(source)
    stdout_path, stderr_path = os.path.join(directory, '.stdout'), os.path.join(directory, '.stderr')
    with open(stdout_path, 'wb') as stdout, open(stderr_path, 'wb') as stderr:
      process = subprocess.Popen(
          [sys.executable, '-I', '-c', _LAUNCHER, str(limits.memory_mb << 20), str(int(limits.seconds) + 1),
           str(limits.output_mb << 20), nonce],
          cwd=directory, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True,
          env={'PATH': os.defpath, 'HOME': directory, 'TMPDIR': directory, 'LC_ALL': 'C.UTF-8'})
      timed_out = False
      try:
        process.wait(timeout=limits.seconds)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        # The whole group: whatever the program started goes with it. Linux keeps the group's id
        # reserved while any member lives, so this reaches nothing else.
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with open(stdout_path, 'rb') as f:
      f.seek(max(0, os.path.getsize(stdout_path) - len(nonce) - 2))
      finished = f.read() == f'\n{nonce}\n'.encode()
    with open(stderr_path, 'rb') as f:
      f.seek(max(0, os.path.getsize(stderr_path) - _MESSAGE_BYTES))
      message = f.read().decode('utf-8', 'replace')
  if timed_out:
    return Outcome(False, f'timed out after {limits.seconds:g} s')
  if process.returncode < 0:
    return Outcome(False, f'killed by {_signal_name(-process.returncode)}')
  if process.returncode:
    lines = [line for line in message.splitlines() if line.strip()]
    return Outcome(False, lines[-1].strip() if lines else f'exit status {process.returncode}')
  return Outcome(True, 'passed') if finished else Outcome(False, 'exited before the end of the tests')


def _signal_name(number: int) -> str:
  try:
    return signal.Signals(number).name
  except ValueError:  # a real-time signal has no name of its own
    return f'signal {number}'


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
  """`run_program` on each source, `workers` (default: one per core) at a time; outcomes in order."""
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda source: run_program(source, limits), sources))
