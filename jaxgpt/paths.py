"""Paths that may be on this machine or in a bucket: `gs://BUCKET/...` and the other URLs etils.epath reads.

Every file a run reads or writes is named through `path()`, an `etils.epath.Path`: a local path
gets `~` expanded and is made absolute; a bucket URL stays as it is. Orbax, TFDS, Grain and JAX's
compilation cache take such paths themselves; the rest of jaxgpt reads and writes through epath.
What only a local disk has stays local, by design (docs/storage.md): the run lock's flock, the
free-space check, and the scratch directory where a bucket's data cache is built before upload.
"""

import contextlib
import dataclasses
import glob as globlib
import os
import shutil
import socket
import tempfile

from etils import epath

from jaxgpt.config import JaxgptError

# The URL schemes epath reads through fsspec; gs:// is what jaxgpt is tested on (tests/test_storage.py).
REMOTE_SCHEMES = ('gs://', 's3://', 'az://', 'hf://')
# The package each scheme needs beyond gcsfs, which jaxgpt installs: named when it is missing.
_SCHEME_PACKAGES = {'s3': 's3fs', 'az': 'adlfs', 'hf': 'huggingface_hub'}


def is_remote(value) -> bool:
  return os.fspath(value).startswith(REMOTE_SCHEMES)


def expand(value) -> str:
  """A user's path with `~` expanded when it is local; a bucket URL as it is."""
  text = os.fspath(value)
  _check_scheme(text)
  return text if is_remote(text) else os.path.expanduser(text)


def path(value) -> epath.Path:
  """A user's path as an epath.Path: local ones expanded and made absolute, bucket URLs as they are."""
  text = expand(value)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def _check_scheme(value: str) -> None:
  if '://' in value and not is_remote(value):
    raise JaxgptError(f'{value}: {value.split("://")[0]}:// paths are not supported. Use a local path or '
                      f'one of {", ".join(REMOTE_SCHEMES)} (gs://BUCKET/... for Google Cloud Storage).')


def bucket(value) -> str:
  """The bucket of a bucket URL: 'b' for gs://b/run."""
  return os.fspath(value).split('://', 1)[1].split('/', 1)[0]


# --- checks before a run starts --------------------------------------------------------------------

def check_writable(directory, what: str) -> None:
  """Creates `directory` and writes and deletes a file in it, so that a missing bucket, missing credentials or
  a read-only disk fail now, in one clear error, rather than at the first save. The file's name holds the host
  and the process id: the hosts of a pod probe one shared directory at the same time."""
  directory = path(directory)
  probe = directory / f'.write-probe-{socket.gethostname()}-{os.getpid()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)  # (a bucket has no directories: nothing to create)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # each storage library raises its own kinds
    raise storage_error(e, f'cannot write to {what} {directory}', directory) from None


def free_bytes(directory) -> int | None:
  """Free space on the local disk holding `directory`; None for a bucket, which has no such limit to check."""
  return None if is_remote(directory) else shutil.disk_usage(path(directory)).free


def storage_error(error: BaseException, doing: str, location) -> JaxgptError:
  """One clear error for a failure `doing` something at `location`: a missing bucket, refused credentials, a
  missing package, or the storage's own message."""
  import google.auth.exceptions  # comes with gcsfs; imported only once something has failed
  from gcsfs.retry import HttpError

  location = os.fspath(location)
  if isinstance(error, ImportError):
    package = _SCHEME_PACKAGES.get(location.split('://')[0], error.name or '')
    return JaxgptError(f'{doing}: {error}. Run: pip install {package}')
  if isinstance(error, google.auth.exceptions.GoogleAuthError) or (
      isinstance(error, HttpError) and error.code in (401, 403)) or str(error).startswith('Forbidden'):
    return JaxgptError(
        f'{doing}: no credentials the storage accepts ({_first_line(error)}). On a workstation run '
        '`gcloud auth application-default login`; on a Cloud VM or TPU VM, give its service account access '
        'to the bucket (roles/storage.objectAdmin) and the cloud-platform scope.')
  if not is_remote(location):
    return JaxgptError(f'{doing} ({getattr(error, "strerror", None) or error}). Choose a writable directory.')
  if isinstance(error, FileNotFoundError):
    name = f'{location.split("://")[0]}://{bucket(location)}'
    return JaxgptError(f'{doing}: the bucket {name} does not exist (or these credentials cannot see it). Create it '
                       f'(for Cloud Storage: `gcloud storage buckets create {name}`) or fix the path.')
  return JaxgptError(f'{doing} ({type(error).__name__}: {_first_line(error)}). Check the path, and that the '
                     'storage is reachable from this machine.')


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [''])[0][:300]


# --- listing, reading and copying ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FileStat:
  size: int
  mtime_ns: int


def stat(file) -> FileStat:
  """Size and modification time (what a data cache's fingerprint covers); FileNotFoundError when missing."""
  if not is_remote(file):
    s = os.stat(expand(file))
    return FileStat(s.st_size, s.st_mtime_ns)
  return _remote_stat(_filesystem(file).info(os.fspath(file)))


def _remote_stat(info: dict) -> FileStat:
  mtime = info.get('mtime')
  return FileStat(int(info.get('size') or 0), int(mtime.timestamp() * 1e9) if mtime else 0)


def glob_files(root, pattern: str) -> dict[str, FileStat]:
  """The files under `root` matching `pattern` (`**` for any depth), by their path relative to `root`.

  Locally this is Python's glob. In a bucket, where epath refuses `**`, it is the storage's own listing
  (one request per thousand files, sizes included); as in Python's glob, a name starting with '.' is
  matched only by a pattern part that starts with '.'.
  """
  root = os.fspath(root)
  if not is_remote(root):
    found = [p for p in globlib.glob(os.path.join(root, pattern), recursive=True) if os.path.isfile(p)]
    return {os.path.relpath(p, root): FileStat(s.st_size, s.st_mtime_ns) for p, s in zip(found, map(os.stat, found))}
  prefix = root.rstrip('/') + '/'
  found = _filesystem(root).glob(prefix + pattern, detail=True)
  scheme = root.split('://')[0] + '://'
  files = {(scheme + name)[len(prefix):]: _remote_stat(info) for name, info in found.items()
           if info.get('type') == 'file'}
  hidden_allowed = any(part.startswith('.') for part in pattern.split('/'))
  return {key: s for key, s in files.items()
          if hidden_allowed or not any(part.startswith('.') for part in key.split('/'))}


@contextlib.contextmanager
def local_copy(file):
  """A local path holding `file`'s bytes, for libraries that read local files only: `file` itself when it is
  local, else a copy in a temporary directory removed afterwards."""
  if not is_remote(file):
    yield os.fspath(file)
    return
  with tempfile.TemporaryDirectory(prefix='jaxgpt-') as scratch:
    copy = os.path.join(scratch, path(file).name)
    _filesystem(file).get_file(os.fspath(file), copy)
    yield copy


def upload_tree(local_dir: str, remote_dir, last: str) -> None:
  """Copies the files under `local_dir` to the bucket directory `remote_dir`, the file named `last` after all the
  others: a reader that finds `last` finds everything, and an upload killed midway leaves no `last`."""
  remote_dir = os.fspath(remote_dir).rstrip('/')
  local, remote = [], []
  for directory, _, names in os.walk(local_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(directory, name), local_dir)
      if relative != last:
        local.append(os.path.join(directory, name))
        remote.append(f'{remote_dir}/{relative}')
  filesystem = _filesystem(remote_dir)
  filesystem.put(local, remote)  # concurrently
  filesystem.put_file(os.path.join(local_dir, last), f'{remote_dir}/{last}')


def _filesystem(url):
  """The fsspec filesystem behind a bucket URL, for what epath lacks: `**` listings, bulk uploads."""
  import fsspec
  return fsspec.core.url_to_fs(os.fspath(url))[0]
