"""The host allocator setting the XLA:CPU step needs: glibc's transparent huge pages, set by re-executing once.

XLA:CPU mallocs a step's large buffers and frees them when the step ends. glibc serves blocks above its mmap
threshold with fresh mmaps and unmaps them on free, so every step touches those buffers anew, one 4 KiB page
fault at a time: at autoj's step on small's dims ~10% of the step, and a [108, 512, 32] x [.., 256, 32]
attention product ran at 18 instead of 45-65 GFLOP/s (README "Performance"). glibc's `malloc.hugetlb=1`
tunable (glibc >= 2.35; older ones ignore it) madvises those mmaps for transparent huge pages: 512x fewer
faults and the same peak RSS. (Keeping freed memory instead, `mmap_max=0` with one arena, was as fast but
raised peak RSS by 60%.) glibc reads tunables only when a process starts, hence the re-exec.

A `glibc.malloc.hugetlb` already in GLIBC_TUNABLES is left as it is: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def environment(environ, thp_setting: str = THP_SETTING) -> dict | None:
  """`environ` with the tunable added to GLIBC_TUNABLES, or None where it does not apply: the key is already
  there (the user's choice, or this process was re-executed), not Linux with glibc, or transparent huge pages
  are off (`never`) or absent."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    with open(thp_setting, encoding="ascii") as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec() -> None:
  """Replaces this process by the same command line with the tunable set (same pid, so signals and launchers
  are unaffected); returns where `environment` says it does not apply. Call it before JAX is imported."""
  env = environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
