"""Shared test fixtures. Eight fake CPU devices are set up before jax is imported anywhere."""

import fcntl
import importlib.util
import os
import pickle

# The tests compile far more than they compute (toy shapes): XLA:CPU's backend (LLVM) at -O0 takes ~40% less CPU
# to compile (test_model + test_attention: 417 -> 261 CPU s) and the programs' results are still compared at
# the same tolerances. Subprocess tests pass it on through xla_flags(). CPU-only machines only: where a GPU or TPU
# plugin is installed (tools/gpu_check.sh) the accelerator's kernels are compiled as users get them.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
ACCELERATOR_PLUGIN = any(importlib.util.find_spec(m) for m in _ACCELERATOR_PLUGINS)
FAST_COMPILE = "" if ACCELERATOR_PLUGIN else "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# The session's cache (below), as pytest-xdist's workers inherit it from the controller's environment: hidden from
# this process's own jax, as in a session without workers.
_SESSION_CACHE = "JAXREWARD_TESTS_XLA_CACHE"
if os.environ.get(_SESSION_CACHE) and os.environ.get("JAX_COMPILATION_CACHE_DIR") == os.environ[_SESSION_CACHE]:
  del os.environ["JAX_COMPILATION_CACHE_DIR"]
import jax  # noqa: E402  pylint: disable=g-import-not-at-top,unused-import  (reads its settings before the next lines)

# One persistent XLA cache for the session's CLI subprocesses (set after this process imported jax, so the tests
# in this process still see every compile: the reward server's recompile counter must not be fooled by cache
# hits). The many runs of configs/tiny.py compile the same programs; the cache saved 13% of their CPU time.
# Fresh per session, so every CI run still compiles every program once; shared by the session's xdist workers.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ.setdefault(_SESSION_CACHE, tempfile.mkdtemp(prefix="jaxreward-tests-xla-cache-"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SESSION_CACHE]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` fake CPU devices (None: the platform's one), compiled fast."""
  return FAST_COMPILE if devices is None else f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def load_config(name: str):
  """A config from configs/ by file name, as config_flags would load it."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture
def tiny_config():
  """configs/tiny.py on one device (the tests' 8 fake devices are opted into per test)."""
  config = load_config("tiny")
  config.mesh.data = 1
  return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """configs/tiny.py trained once for the whole session (train, score, serve and export tests read it; none may
  write into its work dir): {"config", "workdir", "summary"}. pytest-xdist's workers share it: the first to need
  it trains it while the others wait on a lock, then read the summary it returned."""
  from jaxreward import train  # pylint: disable=g-import-not-at-top  (jax: after the XLA_FLAGS above)
  config = load_config("tiny")
  config.mesh.data = 1
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The session's folder; each worker's basetemp is a folder in it.
  root = root / "tiny_run"
  root.mkdir(exist_ok=True)
  workdir, returned = root / "run", root / "summary.pickle"
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if returned.exists():
      summary = pickle.loads(returned.read_bytes())
    else:
      summary = train.train_and_evaluate(config, str(workdir))
      returned.write_bytes(pickle.dumps(summary))
  return {"config": config, "workdir": str(workdir), "summary": summary}


def require_shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (real preference data is only beside the project's own checkout)")
  return SHARED_DATA


def qwen2_style_bpe(texts, vocab_size: int, **special_tokens):
  """A small BPE built offline with the normalizer and pre-tokenizer transformers 5 gives every qwen2 folder's
  tokenizer (it rebuilds them as Qwen2Tokenizer), so an exported Qwen2 model tokenizes as it was trained."""
  import transformers  # Deferred, like every import here: conftest must not import jax before XLA_FLAGS is set.
  # pylint: disable=g-import-not-at-top
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers.models.qwen2 import tokenization_qwen2
  from jaxreward import tokenizer as tokenizer_lib
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(tokenization_qwen2.PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = [tokenizer_lib.PAD, tokenizer_lib.EOS] + list(special_tokens.values())
  tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tokenizer_lib.EOS,
                                              pad_token=tokenizer_lib.PAD, **special_tokens)


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """`-n auto` (pyproject.toml): two workers, as most of the suite's time is XLA compiles that use one core each;
  no more, as the suite is sized for 2 cores and each worker holds 8 fake devices' programs. None (the tests run
  in pytest's own process) where a GPU or TPU plugin is installed: one process must own the accelerator, as JAX
  takes most of its memory up front."""
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return None  # xdist's own hook reads it.
  cores = len(os.sched_getaffinity(0))
  return 0 if ACCELERATOR_PLUGIN or cores < 2 else 2


# Units of work for pytest-xdist's workers (`--dist loadscope` in pyproject.toml: one module each, so its
# module-scoped fixtures are built once), slowest first so that no long one starts last while the other worker
# idles; the other modules follow in file order.
SLOWEST_FIRST = ("test_multiprocess", "test_preemption", "test_hf", "test_checkpoint")


def pytest_collection_modifyitems(config, items):
  if hasattr(config, "workerinput"):  # The controller hands out work in the order its workers collected it.
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))
