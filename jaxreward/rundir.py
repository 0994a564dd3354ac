"""A run's work dir: what defines the run (its identity), which process runs it (its lock), and that it is usable.

Re-running a work dir resumes it, which is only right when the command describes the same run: another seed,
data file, tokenizer or model would continue checkpoints trained on something else and replace the tokenizer
under them. `open` checks, before anything in the work dir is written: that the path is a writable folder,
that no live run holds it (`run.lock`, held by process 0 for the whole run; the lock of a dead process is
taken over), and that a work dir with checkpoints was made by the same run (`run.json`). A mismatch refuses in
one line naming each difference; `train.resume=force` continues anyway and records the differences, which
the model card then lists.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys

import jax
import numpy as np

from jaxreward import artifacts, configuration, hosts, storage

IDENTITY_FILE = "run.json"
LOCK_FILE = "run.lock"

# Settings that change the split, the order or content of batches, or the optimizer's trajectory.
_DATA = ("data.source", "data.tfds_name", "data.format", "data.on_bad_line", "data.max_length", "data.truncation",
         "data.packing", "data.pack_length", "data.num_buckets", "data.sort_window")
_TRAIN = ("train.seed", "train.batch_size", "train.grad_accum_steps", "train.num_steps", "train.num_epochs",
          "train.learning_rate", "train.warmup_steps", "train.schedule", "train.end_learning_rate_factor",
          "train.weight_decay", "train.grad_clip_norm", "train.adam_b1", "train.adam_b2", "train.adam_eps",
          "train.center_rewards_coef")
# The shapes of the parameters: a checkpoint of other shapes cannot be continued, even by force.
_ARCHITECTURE = ("model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
                 "model.num_kv_heads", "model.head_dim", "model.mlp_dim", "model.qkv_bias", "model.tie_embeddings",
                 "model.param_dtype")
_SAME_SHAPES = ("model.rope_theta", "model.rope_scaling", "model.norm_eps")
# What a run writes at the top of its work dir (other files there, e.g. a scheduler's log, are left alone).
_WRITTEN = ("checkpoints", "tokenizer", "config.json", "README.md", "metrics.json", "metrics.jsonl",
            "learning_curves.png", "reliability.png")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


# ---------------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------------


def _file_print(path: str, contents: bool = True) -> dict:
  """Size and sha256 of a file, or of a folder's files (relative names, sizes, contents)."""
  path = os.path.abspath(path)
  digest, size = hashlib.sha256(), 0
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
  try:
    for name in files:
      size += os.path.getsize(name)
      digest.update(os.path.relpath(name, path).encode() + str(os.path.getsize(name)).encode())
      if contents:
        with open(name, "rb") as f:
          for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
  except OSError as e:
    raise configuration.ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
  return {"path": path, "bytes": size, "sha256": digest.hexdigest()[:16]}


def _tokenizer_print(folder: str) -> dict:
  names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
  digest = hashlib.sha256()
  for name in names:
    with open(os.path.join(folder, name), "rb") as f:
      digest.update(name.encode() + f.read())
  return {"path": os.path.abspath(folder), "files": names, "sha256": digest.hexdigest()[:16]}


def identity(config) -> dict:
  """What defines the run, from its settings and the files it reads (before any of them is processed)."""
  d, m = config.data, config.model
  keys = list(_DATA + _TRAIN) + ["model.param_dtype"]
  if not m.init_from:
    keys += list(_ARCHITECTURE + _SAME_SHAPES)
  if not (d.tokenizer or m.init_from):
    keys.append("data.vocab_size")  # The trained BPE tokenizer's size, and the model's when vocab_size is 0.
  if not d.validation_path:
    keys.append("data.validation_fraction")
  if d.source == "jsonl" and not d.train_path:
    keys.append("data.synthetic_pairs")
  if config.train.num_steps:
    keys.remove("train.num_epochs")
  settings = {k: _plain(config[k.split(".")[0]][k.split(".")[1]]) for k in keys}
  files = {}
  for key in ("train_path", "validation_path"):
    if d[key]:
      files[f"data.{key}"] = _file_print(d[key])
  if d.source == "tfds":
    files["data.tfds_data_dir"] = _file_print(os.path.join(d.tfds_data_dir, d.tfds_name.split(":")[0]))
  if d.tokenizer or m.init_from:
    files["tokenizer"] = _tokenizer_print(d.tokenizer or m.init_from)
  if m.init_from:
    # The architecture comes from the HF config; the weights matter only at step 0, and hashing gigabytes
    # on every start would be slow: their sizes are compared.
    files["model.init_from"] = _file_print(os.path.join(m.init_from, "config.json"))
    files["model.init_from weights"] = _file_print(m.init_from, contents=False)
  return {"settings": settings, "files": files}


def _plain(value):
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in sorted(value.items())}
  return value


def differences(old: dict, new: dict) -> list[tuple[str, str, bool]]:
  """[(key, 'old -> new', changes the parameters' shapes)] between two identities."""
  out = []
  for key in sorted(set(old["settings"]) | set(new["settings"])):
    a, b = old["settings"].get(key, "(unset)"), new["settings"].get(key, "(unset)")
    if a != b:
      out.append((key, f"{a!r} -> {b!r}", key in _ARCHITECTURE or key == "data.vocab_size"))
  for key in sorted(set(old.get("files", {})) | set(new.get("files", {}))):
    a, b = old.get("files", {}).get(key), new.get("files", {}).get(key)
    same = a is not None and b is not None and a.get("sha256") == b.get("sha256") and a.get("bytes") == b.get("bytes")
    if not same:
      describe = lambda f: "(none)" if f is None else (
          f"{f['path']} ({f['bytes']:,} bytes, sha256 {f['sha256']})" if "bytes" in f else
          f"{f['path']} (sha256 {f['sha256']})")
      out.append((key, f"{describe(a)} -> {describe(b)}", key == "model.init_from"))
  return out


def _legacy_identity(workdir: str) -> dict | None:
  """The settings part of a work dir made before run.json existed, from its config.json."""
  if not storage.isfile(storage.join(workdir, "config.json")):
    return None
  try:
    old = identity_settings_only(artifacts.read_config(workdir))
  except (configuration.ConfigError, ValueError, KeyError, TypeError, AttributeError):
    return None
  old["settings"].pop("model.vocab_size", None)  # config.json records the resolved size, not the setting.
  return old


def identity_settings_only(config) -> dict:
  keys = [k for k in _DATA + _TRAIN + _ARCHITECTURE + _SAME_SHAPES if not config.model.init_from or
          not k.startswith("model.")]
  return {"settings": {k: _plain(config[k.split(".")[0]][k.split(".")[1]]) for k in keys}, "files": {}}


# ---------------------------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a live process from a later one that reused its pid)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # Another machine's process cannot be checked from here.
  pid = int(holder.get("pid", -1))
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  started = _start_time(pid)
  return started is None or holder.get("start_time") in (None, started)


class Lock:
  """`run.lock`, created atomically (a complete file is hard-linked into place) and removed on release.

  An object store (a remote work dir) has no link or exclusive create through epath: there the lock is a
  check-then-write (absent -> written -> read back as ours), which catches a run that is already going but not
  two started within the same moment; `acquire` says so in a warning."""

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, LOCK_FILE)
    self.remote = storage.is_remote(workdir)
    self.held = False

  def _read(self) -> dict | None:
    try:
      return json.loads(storage.read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _in_use(self, holder: dict) -> configuration.ConfigError:
    here = holder.get("host") == socket.gethostname()
    return configuration.ConfigError(
        f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
        f"started {holder.get('started')}); wait for it to end or use another --workdir"
        f"{'' if here else f' (if it is dead, delete {self.path})'}")

  def acquire(self, log) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    if self.remote:
      self._acquire_remote(me, log)
      return
    temporary = f"{self.path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
      json.dump(me, f)
    try:
      for _ in range(3):
        try:
          os.link(temporary, self.path)
          self.held = True
          return
        except FileExistsError:
          pass
        holder = self._read()
        if holder is None:
          continue
        if holder and _alive(holder):
          raise self._in_use(holder)
        stale = f"{self.path}.stale.{os.getpid()}"
        try:
          os.rename(self.path, stale)
        except FileNotFoundError:
          continue
        os.remove(stale)
        log(f"warning: {self.path}: took over the lock of pid {holder.get('pid')} on {holder.get('host')}, "
            "which is no longer running")
      raise configuration.ConfigError(f"{self.path}: could not take the work dir's lock (other runs keep taking it)")
    finally:
      os.remove(temporary)

  def _acquire_remote(self, me: dict, log) -> None:
    holder = self._read()
    if holder and _alive(holder):
      raise self._in_use(holder)
    if holder is not None:
      log(f"warning: {self.path}: took over the lock of pid {holder.get('pid')} on {holder.get('host')}, "
          "which is no longer running")
    storage.write_atomically(self.path, json.dumps(me))
    if (self._read() or {}).get("pid") != me["pid"]:
      raise self._in_use(self._read() or {})
    self.held = True
    log(f"warning: {self.path}: a remote work dir has no atomic create; the lock stops a run while another holds "
        "it, not two started at the same moment")

  def release(self) -> None:
    if self.held and (self._read() or {}).get("pid") == os.getpid():
      storage.path(self.path).unlink(missing_ok=True)
    self.held = False


# ---------------------------------------------------------------------------------------------------------------
# The work dir
# ---------------------------------------------------------------------------------------------------------------


def has_checkpoints(workdir: str) -> bool:
  return any(name.isdigit() for name in storage.listdir(storage.join(workdir, "checkpoints")))


def _usable_folder(workdir: str) -> bool:
  """Checks the path is (or can become) a writable folder; True when this call created it. A remote folder
  (an object store's prefix) exists once a file is in it: nothing to create or check before the lock's write."""
  if storage.is_remote(workdir):
    if storage.isfile(workdir):
      raise configuration.ConfigError(f"--workdir {workdir} is a file; expected a folder")
    return False
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise configuration.ConfigError(f"--workdir {workdir} is a file; expected a folder")
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise configuration.ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise configuration.ConfigError(f"--workdir {workdir} is not writable")
  return created


class RunDir:
  """The checked, locked work dir of this run; `record()` writes run.json once the run's checks pass."""

  def __init__(self, workdir: str, log):
    self.workdir, self.log = os.fspath(storage.path(workdir)), log
    self.identity = None
    self.forced_resumes = []
    self._lock = Lock(self.workdir)
    self._created = False
    self.is_main = hosts.is_main()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def open(self, config) -> "RunDir":
    error = ""
    if self.is_main:
      try:
        self._created = _usable_folder(self.workdir)
        try:
          self._lock.acquire(self.log)
        except OSError as e:
          raise configuration.ConfigError(f"--workdir {self.workdir}: cannot write its lock file "
                                          f"({e.strerror or e})") from None
        self._check(config)
      except configuration.ConfigError as e:
        self.release()
        error = str(e)
    if hosts.several():
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.process_allgather(np.int32(bool(error))).any() and not error:
        error = f"{self.workdir}: refused by process 0 (its log says why)"
    if error:
      raise configuration.ConfigError(error)
    return self

  def _check(self, config) -> None:
    self.identity = identity(config)
    path = storage.join(self.workdir, IDENTITY_FILE)
    recorded = None
    if storage.isfile(path):
      try:
        recorded = json.loads(storage.read_text(path))
        old = recorded["identity"]
        self.forced_resumes = list(recorded.get("forced_resumes", []))
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise configuration.ConfigError(f"{path}: unreadable ({e}); use a new --workdir") from None
    else:
      old = _legacy_identity(self.workdir)
      ours = sorted(set(storage.listdir(self.workdir)) & set(_WRITTEN))
      if old is None and ours:
        raise configuration.ConfigError(f"--workdir {self.workdir} holds {', '.join(ours)} but no {IDENTITY_FILE} "
                                        "or config.json of a jaxreward run; the run would overwrite them: use a new "
                                        "or empty folder")
    if old is None or not has_checkpoints(self.workdir):
      return  # Nothing to resume: the run starts afresh.
    new = self.identity
    if recorded is None:  # A work dir from before run.json: compare the settings it recorded.
      new = {"settings": {k: v for k, v in new["settings"].items() if k in old["settings"]}, "files": {}}
    diffs = differences(old, new)
    if not diffs:
      return
    listed = "; ".join(f"{key} {change}" for key, change, _ in diffs)
    shapes = [key for key, _, changes_shapes in diffs if changes_shapes]
    if shapes:
      raise configuration.ConfigError(f"{self.workdir} holds another run: {listed}; the model's shapes differ "
                                      f"({', '.join(shapes)}), so its checkpoints cannot be continued: use a "
                                      "new --workdir")
    if config.train.resume != "force":
      raise configuration.ConfigError(f"{self.workdir} holds another run: {listed}; use a new --workdir, or "
                                      "--config.train.resume=force to continue its checkpoints anyway (the "
                                      "differences go into the model card)")
    step = max(int(n) for n in storage.listdir(storage.join(self.workdir, "checkpoints")) if n.isdigit())
    self.forced_resumes.append({"step": step, "differences": [f"{key} {change}" for key, change, _ in diffs],
                                "at": datetime.datetime.now().isoformat(timespec="seconds")})
    self.log(f"warning: resuming {self.workdir} by force despite: {listed} (recorded in {IDENTITY_FILE} and "
             "the model card)")

  def record(self) -> None:
    """Writes run.json (process 0): from here on the work dir belongs to this run."""
    if not self.is_main:
      return
    storage.write_atomically(storage.join(self.workdir, IDENTITY_FILE),
                     json.dumps({"identity": self.identity, "forced_resumes": self.forced_resumes}, indent=2))

  def release(self) -> None:
    self._lock.release()
    if self._created and os.path.isdir(self.workdir) and not os.listdir(self.workdir):  # Local only (_created).
      os.rmdir(self.workdir)  # A refused run leaves no empty folder behind.
    self._created = False


def open_run(workdir: str, config, log) -> RunDir:
  return RunDir(workdir, log).open(config)
