"""allocator: the huge-page tunable is added once, respects the user's own setting, and the re-exec keeps the pid."""

import importlib
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxreward import allocator

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def thp(tmp_path):
  def write(setting):
    path = tmp_path / "enabled"
    path.write_text(setting)
    return str(path)
  return write


@pytest.mark.skipif(not GLIBC_LINUX, reason="the tunable is glibc's, on Linux")
def test_environment_adds_the_tunable_once(thp):
  env = allocator.environment({"PATH": "/bin"}, thp("always [madvise] never\n"))
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert allocator.environment(env, thp("always [madvise] never\n")) is None  # After the re-exec: no loop.


@pytest.mark.skipif(not GLIBC_LINUX, reason="the tunable is glibc's, on Linux")
def test_environment_keeps_the_users_tunables(thp):
  env = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp("[always] madvise never\n"))
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # The user's own hugetlb value (0 turns it off) is left alone.
  assert allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp("[always]\n")) is None


def test_environment_does_nothing_without_huge_pages(thp, tmp_path):
  assert allocator.environment({}, thp("always madvise [never]\n")) is None
  assert allocator.environment({}, str(tmp_path / "missing")) is None


@pytest.mark.skipif(not GLIBC_LINUX or allocator.environment({}) is None,
                    reason="needs glibc on Linux with transparent huge pages not off")
def test_reexec_replaces_the_process_with_the_tunable_set(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
      from jaxreward import allocator
      allocator.reexec()
      print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
  """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, str(script), "--x=1"], env=env, capture_output=True, text=True,
                       check=True, timeout=60).stdout.split("\n")
  first, second, after = out[0].split(), out[1].split(), out[2].split()
  assert first[:3] == ["start", first[1], "None"]
  assert second[:3] == ["start", first[1], "glibc.malloc.hugetlb=1"]  # Same pid: exec'd, not spawned.
  assert after[:3] == ["after", first[1], "glibc.malloc.hugetlb=1"]
  assert out[2].endswith("['--x=1']")


@pytest.mark.parametrize("name", ["jaxreward.main", "jaxreward.commands.evaluate", "jaxreward.commands.export",
                                  "jaxreward.commands.score", "jaxreward.commands.serve"])
def test_every_command_entry_point_reexecs_first(monkeypatch, name):
  # The installed scripts ([project.scripts]) call run() directly, without the module's `python -m` block.
  class ReExec(Exception):
    pass

  def reexec():
    raise ReExec

  module = importlib.import_module(name)
  monkeypatch.setattr(allocator, "reexec", reexec)
  with pytest.raises(ReExec):
    module.run()
