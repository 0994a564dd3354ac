"""Where a run's files live: a local folder, or any `etils.epath` URL (`gs://bucket/run`, `s3://...`).

Every file a run writes or reads in its work dir goes through `path()` (an `epath.Path`, absolute when local,
the URL as given otherwise). Object stores differ from a file system in three ways this module covers:
- No rename: `write_atomically` writes a temporary file and renames it locally; remotely it writes the object
  in one upload, which the store makes visible only once complete (GCS, S3), so no reader sees half a file.
- No append: a file that grows (metrics.jsonl) is rewritten whole on each write to a remote work dir.
- Libraries that need a local folder (transformers' save_pretrained / from_pretrained, tensorboardX, matplotlib)
  write to or read from a local temporary copy (`local_copy`, `upload_folder`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from etils import epath


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def path(p) -> epath.Path:
  """The work dir's (or a file's) path: a URL as given, a local path made absolute."""
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def join(p, *parts) -> str:
  return os.fspath(path(p).joinpath(*parts))


def isfile(p) -> bool:
  p = path(p)
  return p.exists() and not p.is_dir()


def isdir(p) -> bool:
  return path(p).is_dir()


def listdir(p) -> list[str]:
  return sorted(child.name for child in path(p).iterdir()) if isdir(p) else []


def read_text(p) -> str:
  return path(p).read_text()


def write_atomically(p, data: str | bytes) -> None:
  """A complete file at `p`, or the old one: never a half-written file where readers look."""
  p = path(p)
  if is_remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)  # One upload: visible once complete.
    return
  os.makedirs(p.parent, exist_ok=True)
  temporary = f"{p}.tmp"
  with open(temporary, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(temporary, p)


def upload_folder(local: str, target) -> None:
  """Copies the files of the local folder `local` (recursively) into `target`, file by file."""
  target = path(target)
  for root, _, names in os.walk(local):
    for name in names:
      source = os.path.join(root, name)
      destination = target / os.path.relpath(source, local)
      destination.parent.mkdir(parents=True, exist_ok=True)
      destination.write_bytes(epath.Path(source).read_bytes())


def move_folder(source, target) -> None:
  """Renames a folder; an object store has no rename, so there each file is copied, then the source removed."""
  source, target = path(source), path(target)
  if not is_remote(source):
    os.makedirs(target.parent, exist_ok=True)
    os.replace(source, target)
    return
  for child in _files(source):
    (target / child.relative_to(source)).write_bytes(child.read_bytes())
  source.rmtree()


def _files(folder: epath.Path):
  """The files under `folder`, recursively (epath's glob refuses `**` on object stores, and fsspec's walk drops
  the URL scheme)."""
  for child in folder.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


@contextlib.contextmanager
def local_copy(folder):
  """A local folder holding `folder`'s files (the folder itself when it is local)."""
  folder = path(folder)
  if not is_remote(folder):
    yield os.fspath(folder)
    return
  temporary = tempfile.mkdtemp(prefix="jaxreward-")
  try:
    for child in _files(folder):
      local = os.path.join(temporary, os.fspath(child.relative_to(folder)))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with open(local, "wb") as f:
        f.write(child.read_bytes())
    yield temporary
  finally:
    shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def writing_folder(folder):
  """A local folder to write `folder`'s files into: the folder itself when local, else a temporary one that is
  uploaded once the block ends without error."""
  folder = path(folder)
  if not is_remote(folder):
    os.makedirs(folder, exist_ok=True)
    yield os.fspath(folder)
    return
  temporary = tempfile.mkdtemp(prefix="jaxreward-")
  try:
    yield temporary
    upload_folder(temporary, folder)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
