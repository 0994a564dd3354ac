"""Per-host weight loading on a simulated pod: the bytes of weights each host reads, and its start-up time.

  python tools/pod_weights.py [--processes 4] [--mesh fsdp=4] [--baseline REV] [--dir /tmp/pod_weights]

Writes (once, into --dir) a checkpoint with Llama-3-8B's structure and shrunk widths, as an HF folder of bf16
safetensors shards: 32 layers, 32 query / 8 key-value heads, SwiGLU with mlp = 3.5 x hidden, untied LM head,
llama3 RoPE, but hidden 256 (head_dim 8), mlp 896 and vocab 8192 (real: 4096, 14336, 128256) so that four
processes fit a 2-core CPU machine. Then starts --processes processes on localhost (one CPU device each,
jax.distributed over gloo, each under `timeout -s KILL`) that build the abstract sharded parameters for --mesh
(axes data/fsdp/tensor, the default rules) and call `hf.load_params` into them. With --baseline the same runs
first with the jaxreward package of that git revision (extracted to a temporary folder): the code before.

Bytes are counted the same way for both codes: each worker wraps safetensors' `safe_open` and sums the size of
every tensor or slice it hands out, and the 4 KiB pages of the files those bytes lie in (memory-mapped files are
read in pages: a slice of a row-major tensor's inner axis is a strided run per row, and short runs share pages
with the other hosts' runs). Both counts take time inside the load, for both codes alike. Start-up is the wall
time from launching the process to its parameters being loaded and ready (imports, jax.distributed.initialize,
abstract model, load). A projection gives the bytes (and pages) host 0 reads at Llama-3-8B's real widths (bf16)
under the same mesh and rules. The last line is one JSON object.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
from flax import nnx

# Only modules that the baseline revision has too: a worker may run with that revision's package.
from jaxreward import configuration, hf, model as model_lib, sharding, state

_PROCESSES = flags.DEFINE_integer("processes", 4, "processes on localhost, one CPU device each")
_MESH = flags.DEFINE_string("mesh", "fsdp=4", "mesh axis sizes, e.g. fsdp=4 or fsdp=2,tensor=2")
_BASELINE = flags.DEFINE_string("baseline", None, "git revision whose jaxreward loads first (the code before)")
_DIR = flags.DEFINE_string("dir", os.path.join(tempfile.gettempdir(), "pod_weights"), "checkpoint and baseline")
# A worker's own settings (the driver passes them).
_WORKER = flags.DEFINE_integer("worker", None, "internal: this worker's process id")
_PORT = flags.DEFINE_integer("port", 0, "internal: the coordinator's port")
_FOLDER = flags.DEFINE_string("folder", None, "internal: the checkpoint folder")
_LAUNCHED = flags.DEFINE_float("launched", 0.0, "internal: time.time() when the workers were launched")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 8, "vocab_size": 8192}
REAL_DIMS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256}
SHARDS = 4  # Meta-Llama-3-8B ships as model-0000{1..4}-of-00004.safetensors.
KILL_AFTER_S = 600


def hf_config(dims: dict) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "max_position_embeddings": 8192, "bos_token_id": 0, "eos_token_id": 1,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **dims}


def hf_shapes(dims: dict) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
  d, f, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
  nh, kh = dims["num_attention_heads"] * dims["head_dim"], dims["num_key_value_heads"] * dims["head_dim"]
  out = [("model.embed_tokens.weight", (v, d))]
  for i in range(dims["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (nh, d)),
            (p + "self_attn.k_proj.weight", (kh, d)), (p + "self_attn.v_proj.weight", (kh, d)),
            (p + "self_attn.o_proj.weight", (d, nh)), (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f))]
  return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_checkpoint(folder: str) -> int:
  """The simulated checkpoint (random bf16 weights); returns its weight bytes."""
  # Deferred: the baseline revision's package, which a worker may import, has no weights.py.
  from jaxreward import weights  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config(DIMS), f, indent=2)
  rng = np.random.default_rng(0)
  shapes = hf_shapes(DIMS)
  total = sum(math.prod(s) for _, s in shapes) * 2
  entries = [(name, shape, jnp.bfloat16,
              lambda shape=shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16))
             for name, shape in shapes]
  # Shards as Meta's: some full ones and a short last one.
  weights.write(entries, folder, max_shard_bytes=int(total / (SHARDS - 0.5)) + 1, metadata={"format": "pt"})
  return total


# --- One worker ---------------------------------------------------------------------------------------------------

PAGE = 4096
_READ = {"bytes": 0, "pages": {}}  # Bytes handed out; per file, a bitmap of the 4 KiB pages they lie in.


def data_offsets(path: str) -> tuple[int, dict]:
  """(file size, tensor name -> (byte offset of its data in the file, itemsize)) from a safetensors header."""
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
  itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}
  return os.path.getsize(path), {name: (8 + length + info["data_offsets"][0], itemsize[info["dtype"]])
                                 for name, info in header.items() if name != "__metadata__"}


def mark_pages(bitmap, begin: int, shape, itemsize: int, bounds) -> None:
  """Marks in `bitmap` the pages holding the part `bounds` ((start, stop) per axis, row-major) of a tensor whose
  data starts at byte `begin`: one contiguous run per row of a 2-D tensor."""
  if len(shape) == 1:
    starts, ends = np.array([bounds[0][0]]), np.array([bounds[0][1]])
  else:
    rows = np.arange(*bounds[0], dtype=np.int64)
    starts, ends = rows * shape[1] + bounds[1][0], rows * shape[1] + bounds[1][1]
  lo, hi = (begin + starts * itemsize) // PAGE, (begin + ends * itemsize - 1) // PAGE
  edges = np.zeros(len(bitmap) + 1, np.int64)
  np.add.at(edges, lo, 1)
  np.add.at(edges, hi + 1, -1)
  bitmap |= np.cumsum(edges[:-1]) > 0


def _bounds(index, shape):
  index = () if index is Ellipsis else tuple(index)
  index += (slice(None),) * (len(shape) - len(index))
  return [s.indices(n)[:2] for s, n in zip(index, shape)]


class _Slice:
  def __init__(self, inner, record):
    self._inner, self._record = inner, record

  def get_shape(self):
    return self._inner.get_shape()

  def get_dtype(self):
    return self._inner.get_dtype()

  def __getitem__(self, index):
    value = self._inner[index]
    self._record(_bounds(index, self._inner.get_shape()), value.nbytes)
    return value


class _Handle:
  """safe_open's handle, recording the bytes (and file pages) of what it returns."""

  def __init__(self, inner, path):
    self._inner, self._path = inner, path
    size, self._where = data_offsets(path)
    _READ["pages"].setdefault(path, np.zeros(-(-size // PAGE), bool))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def keys(self):
    return self._inner.keys()

  def _recorder(self, name, shape):
    begin, itemsize = self._where[name]

    def record(bounds, nbytes):
      _READ["bytes"] += nbytes
      mark_pages(_READ["pages"][self._path], begin, shape, itemsize, bounds)

    return record

  def get_tensor(self, name):
    value = self._inner.get_tensor(name)
    self._recorder(name, value.shape)(_bounds((), value.shape), value.nbytes)
    return value

  def get_slice(self, name):
    inner = self._inner.get_slice(name)
    return _Slice(inner, self._recorder(name, inner.get_shape()))


def _counting_safe_open(path, framework, device="cpu"):
  return _Handle(safetensors.safe_open(path, framework, device=device), path)


def worker() -> None:
  jax.config.update("jax_num_cpu_devices", 1)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{_PORT.value}", num_processes=_PROCESSES.value,
                             process_id=_WORKER.value)
  initialized = time.time()
  for module in list(sys.modules.values()):  # hf (the baseline) or weights (now) opens the files.
    if getattr(module, "__name__", "").startswith("jaxreward") and hasattr(module, "safe_open"):
      module.safe_open = _counting_safe_open
  mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **parse_mesh(_MESH.value),
                                        "rules": configuration.defaults().mesh.rules})
  mesh = sharding.make_mesh(mesh_cfg)
  cfg = hf.model_config(_FOLDER.value, configuration.defaults().model)
  _, target = state.params_target(cfg, mesh, sharding.rules(mesh_cfg))
  start = time.time()
  params = hf.load_params(_FOLDER.value, target)
  arrays = [v.get_value() for _, v in nnx.to_flat_state(params) if isinstance(v.get_value(), jax.Array)]
  jax.block_until_ready(arrays)
  done = time.time()
  checksum = sum(float(np.asarray(s.data, np.float64).sum()) for a in arrays for s in a.addressable_shards)
  pages = sum(int(b.sum()) for b in _READ["pages"].values()) * PAGE
  print(json.dumps({"process": jax.process_index(), "bytes_read": _READ["bytes"], "page_bytes": pages,
                    "load_s": done - start, "startup_s": done - _LAUNCHED.value,
                    "init_s": initialized - _LAUNCHED.value,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "checksum": checksum, "jaxreward": os.path.dirname(hf.__file__)}), flush=True)


# --- The driver ---------------------------------------------------------------------------------------------------


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(configuration.EXIT_BAD_INPUT)


def parse_mesh(text: str) -> dict:
  try:
    sizes = {k: int(v) for k, v in (part.split("=") for part in text.split(","))}
  except ValueError:
    sizes = {"": 0}
  if not set(sizes) <= set(sharding.MESH_AXES) or min(sizes.values()) < 1:
    fail(f"--mesh {text!r}; expected sizes of {'/'.join(sharding.MESH_AXES)}, e.g. fsdp=4 or fsdp=2,tensor=2")
  return sizes


def run(folder: str, code: str, processes: int, mesh: str) -> list[dict]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=code)
  launched = time.time()
  procs = [subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, os.path.abspath(__file__),
                             "--worker", str(i), "--port", str(port), "--processes", str(processes), "--mesh", mesh,
                             "--folder", folder, "--launched", repr(launched)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  results = []
  for p in procs:
    out, err = p.communicate()
    if p.returncode:
      print(err[-3000:], file=sys.stderr)
      sys.exit(f"error: worker exited {p.returncode} (-9/137: killed after {KILL_AFTER_S} s)")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def projection(mesh: dict) -> tuple[int, int]:
  """(bytes, bytes of 4 KiB pages) that host 0 reads at Llama-3-8B's real widths (bf16, one device per host) under
  `mesh` and the default rules, from one safetensors file with the tensors in name order."""
  table = dict(configuration.defaults().mesh.rules)
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
  cfg = model_lib.ModelConfig(vocab_size=REAL_DIMS["vocab_size"], hidden_size=REAL_DIMS["hidden_size"],
                              num_layers=REAL_DIMS["num_hidden_layers"], num_heads=REAL_DIMS["num_attention_heads"],
                              num_kv_heads=REAL_DIMS["num_key_value_heads"], head_dim=REAL_DIMS["head_dim"],
                              mlp_dim=REAL_DIMS["intermediate_size"])
  with nnx.use_eager_sharding(False):  # Shapes and logical axes only: no mesh needed.
    _, abstract = state.abstract_params(cfg)
  names = hf.name_map(cfg)
  blocks = {}
  for path, var in nnx.to_flat_state(abstract):
    name, transpose = names[path]
    bounds = []
    for n, axis_name in zip(var.shape, var.get_metadata().get("out_sharding") or (None,) * len(var.shape)):
      mapped = table.get(axis_name) if axis_name else None
      split = math.prod(sizes.get(a, 1) for a in (mapped if isinstance(mapped, (list, tuple)) else [mapped]) if a)
      bounds.append((0, n // split))  # Host 0 holds the first block of every split axis.
    blocks[name] = (var.shape[::-1] if transpose else var.shape, bounds[::-1] if transpose else bounds)
  # One file: its data starts after the JSON header (8-byte aligned), so rows are not page-aligned.
  header, offset = {}, 0
  for name, shape in sorted(hf_shapes(REAL_DIMS)):
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape) * 2]}
    offset += math.prod(shape) * 2
  offset, read, pages = 8 + -(-len(json.dumps(header, separators=(",", ":"))) // 8) * 8, 0, 0
  for name, shape in sorted(hf_shapes(REAL_DIMS)):
    file_shape, bounds = blocks[name]
    assert tuple(file_shape) == tuple(shape), name
    begin = offset % PAGE
    bitmap = np.zeros(-(-(begin + math.prod(shape) * 2) // PAGE), bool)
    mark_pages(bitmap, begin, shape, 2, bounds)
    read += math.prod(b - a for a, b in bounds) * 2
    pages += int(bitmap.sum()) * PAGE
    offset += math.prod(shape) * 2
  return read, pages


def main(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  if _WORKER.value is not None:
    worker()
    return
  mesh = parse_mesh(_MESH.value)
  processes = _PROCESSES.value
  if math.prod(mesh.values()) != processes:
    fail(f"--mesh {_MESH.value} needs {math.prod(mesh.values())} devices; --processes is {processes}")
  folder = os.path.join(_DIR.value, "llama3_8b_shrunk")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    write_checkpoint(folder)
  file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
  codes = [("now", os.path.dirname(os.path.dirname(hf.__file__)))]  # The package this driver imported.
  if _BASELINE.value:
    base = os.path.join(_DIR.value, "baseline")
    subprocess.run(["rm", "-rf", base], check=True)
    os.makedirs(base)
    archive = subprocess.run(["git", "-C", ROOT, "archive", _BASELINE.value, "jaxreward"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    codes.insert(0, (f"baseline {_BASELINE.value}", base))
  rows = {}
  print(f"checkpoint {folder}: {len(hf_shapes(DIMS))} tensors, {file_bytes / 2**20:.1f} MiB in "
        f"{sum(f.endswith('.safetensors') for f in os.listdir(folder))} shards; mesh {_MESH.value}, "
        f"{processes} processes x 1 CPU device")
  print("| code | process | weights read (MiB) | share of file | 4 KiB pages they span (MiB) | load (s) | "
        "start-up (s) | peak RSS (MiB) |")
  print("|---|---|---|---|---|---|---|---|")
  for label, code in codes:
    rows[label] = run(folder, code, processes, _MESH.value)
    for r in rows[label]:
      print(f"| {label} | {r['process']} | {r['bytes_read'] / 2**20:.1f} | {r['bytes_read'] / file_bytes:.2f} | "
            f"{r['page_bytes'] / 2**20:.1f} | {r['load_s']:.2f} | {r['startup_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |")
  if _BASELINE.value:
    same = [a["checksum"] == b["checksum"] for a, b in zip(*rows.values())]
    print(f"loaded parameters equal to the baseline's (per-process checksums): {all(same)}")
  projected, projected_pages = projection(mesh)
  real_total = sum(math.prod(s) for _, s in hf_shapes(REAL_DIMS)) * 2
  print(f"projection at Llama-3-8B's real widths (bf16, {real_total / 1e9:.2f} GB), host 0: reads "
        f"{projected / 1e9:.2f} GB spanning {projected_pages / 1e9:.2f} GB of 4 KiB pages now; "
        f"{real_total / 1e9:.2f} GB before")
  print(json.dumps({"mesh": _MESH.value, "processes": processes, "dims": DIMS, "file_bytes": file_bytes,
                    "runs": rows, "projected_bytes_host0": projected, "projected_page_bytes_host0": projected_pages,
                    "real_file_bytes": real_total}))


if __name__ == "__main__":
  app.run(main)
