"""Where commands write their results: paths checked before any work, and folders replaced whole.

An export written into an existing folder mixes with what is there (another model's index and shards win at
load time), and one written into a work dir replaces the run's own config.json. So a folder output must be
new or empty, or `--overwrite` replaces it: the result is written to a temporary sibling and renamed into
place only once complete, and a work dir (or a folder holding one) is never a target.

Outputs may also be remote (any etils.epath URL, storage.py). An object store has no rename: there a folder is
written locally, the old one removed, then the new one uploaded file by file (a reader in between sees it
incomplete), and a file is one upload (complete or absent).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from jaxreward import storage
from jaxreward.configuration import ConfigError


def is_workdir(path: str) -> bool:
  names = set(storage.listdir(path))
  return "run.json" in names or "checkpoints" in names or {"config.json", "tokenizer"} <= names


def _check_parent(path: str, flag: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag} {path}: {existing} is not writable")


def check_file(path: str, flag: str = "--out") -> None:
  """An output file path: not a folder, in a folder that exists or can be made and is writable (local)."""
  if storage.isdir(path):
    raise ConfigError(f"{flag} {path} is a folder; expected a file path such as {storage.join(path, 'scored.jsonl')}")
  if not storage.is_remote(path):
    _check_parent(path, flag)


def check_folder(path: str, overwrite: bool, flag: str = "out", sources: tuple[str, ...] = ()) -> None:
  """An output folder: new, empty, or replaceable with `overwrite`; never a work dir or one of `sources`."""
  if storage.is_remote(path):
    _check_remote_folder(path, overwrite, flag, sources)
    return
  target = os.path.abspath(path)
  if os.path.exists(target) and not os.path.isdir(target):
    raise ConfigError(f"{flag} {path} is a file; expected a folder")
  for source in sources:
    source = os.fspath(storage.path(source))
    if target == source or source.startswith(target + os.sep) or target.startswith(source + os.sep):
      raise ConfigError(f"{flag} {path} is, holds or lies inside the source {source}; choose a folder outside it")
  inside = target
  while inside != os.path.dirname(inside):
    if is_workdir(inside):
      raise ConfigError(f"{flag} {path} {'is' if inside == target else 'lies inside'} the jaxreward work dir "
                        f"{inside}; export to a folder outside it")
    inside = os.path.dirname(inside)
  if os.path.isdir(target) and os.listdir(target):
    if not overwrite:
      raise ConfigError(f"{flag} {path} is not empty; choose a new folder, or pass --overwrite to replace it")
    for root, dirs, _ in os.walk(target):
      if any(is_workdir(os.path.join(root, d)) for d in dirs):
        raise ConfigError(f"{flag} {path} holds a jaxreward work dir; --overwrite would delete it")
  _check_parent(target, flag)


def _check_remote_folder(path: str, overwrite: bool, flag: str, sources: tuple[str, ...]) -> None:
  target = os.fspath(storage.path(path)).rstrip("/")
  if storage.isfile(target):
    raise ConfigError(f"{flag} {path} is a file; expected a folder")
  for source in sources:
    source = os.fspath(storage.path(source)).rstrip("/")
    if target == source or source.startswith(target + "/") or target.startswith(source + "/"):
      raise ConfigError(f"{flag} {path} is, holds or lies inside the source {source}; choose a folder outside it")
  if is_workdir(target):
    raise ConfigError(f"{flag} {path} is a jaxreward work dir; export to a folder outside it")
  if storage.listdir(target) and not overwrite:
    raise ConfigError(f"{flag} {path} is not empty; choose a new folder, or pass --overwrite to replace it")


@contextlib.contextmanager
def replaced_folder(path: str):
  """Yields a temporary sibling folder to write into; on success it takes `path`'s place (the old one goes)."""
  if storage.is_remote(path):
    with _replaced_remote_folder(path) as temporary:
      yield temporary
    return
  target = os.path.abspath(path)
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  temporary = os.path.join(parent, f".{name}.partial-{os.getpid()}")
  shutil.rmtree(temporary, ignore_errors=True)
  os.makedirs(temporary)
  try:
    yield temporary
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  old = os.path.join(parent, f".{name}.old-{os.getpid()}")
  if os.path.exists(target):
    os.rename(target, old)
  os.rename(temporary, target)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _replaced_remote_folder(path: str):
  temporary = tempfile.mkdtemp(prefix="jaxreward-out-")
  try:
    yield temporary
    if storage.isdir(path):
      storage.path(path).rmtree()
    storage.upload_folder(temporary, path)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
