"""Runs many jaxgpt commands, each in its own process, paying for the imports once.

`python tests/forked_cli.py CASES.json RESULTS.json`: CASES is a list of
{"module", "args", "env"}; each case runs in a child forked from this process
after it has imported the entry points (JAX and the rest: most of a command's
start-up), so a case costs its own work only. A child is a real command run:
its own argv, environment, exit status and stderr, nothing shared but the
imports (no JAX backend is started before the fork). RESULTS gets one
{"returncode", "stdout", "stderr"} per case, in order.
"""

import importlib
import json
import os
import sys
import tempfile

ENTRY_POINTS = ('jaxgpt.train', 'jaxgpt.prepare', 'jaxgpt.sample', 'jaxgpt.evaluate', 'jaxgpt.convert')
AT_ONCE = 3


def _run_child(case: dict, out_path: str, err_path: str) -> None:
  """In the forked child: the command, as `python -m module args` would run it; never returns."""
  code = 1
  try:
    for fd, path in ((1, out_path), (2, err_path)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(case.get('env') or {})
    sys.argv = [case['module'], *case['args']]
    try:
      importlib.import_module(case['module']).cli()
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # a crash is reported as python -m would report it: a traceback and status 1
    import traceback
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(cases_path: str, results_path: str) -> None:
  with open(cases_path) as f:
    cases = json.load(f)
  for module in ENTRY_POINTS:
    importlib.import_module(module)
  scratch = tempfile.mkdtemp()
  results, running, pending = [None] * len(cases), {}, list(enumerate(cases))
  while pending or running:
    while pending and len(running) < AT_ONCE:
      index, case = pending.pop(0)
      out_path, err_path = (os.path.join(scratch, f'{index}.{name}') for name in ('out', 'err'))
      pid = os.fork()
      if pid == 0:
        _run_child(case, out_path, err_path)
      running[pid] = (index, out_path, err_path)
    pid, status = os.wait()
    index, out_path, err_path = running.pop(pid)
    with open(out_path) as out, open(err_path) as err:
      results[index] = {'returncode': os.waitstatus_to_exitcode(status), 'stdout': out.read(), 'stderr': err.read()}
  with open(results_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
