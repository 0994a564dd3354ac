"""Shared test fixtures. Eight fake CPU devices are set up before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_config(name: str):
  """A config from configs/ by file name, as config_flags would load it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
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


def require_shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (real preference data is only beside the project's own checkout)")
  return SHARED_DATA
