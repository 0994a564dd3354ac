"""Exports a jaxreward work dir as a transformers reward model: `jaxreward.commands.export` (see there).

  python tools/convert_to_hf.py runs/smollm2 runs/smollm2_rm [--checkpoint best|latest|STEP]
"""

from __future__ import annotations

from jaxreward.commands.export import main, run  # noqa: F401  (main: called in-process by tests/test_hf.py)

if __name__ == "__main__":
  run()
