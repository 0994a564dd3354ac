"""jaxreward: reward-model training for RLHF in JAX.

`jaxreward.load_scorer(path, checkpoint="best")` returns a callable (prompts, responses) -> rewards; it is
imported on first use so that `import jaxreward` stays cheap (no JAX, no transformers).
"""


def __getattr__(name):
  if name == "load_scorer":
    from jaxreward.score import load_scorer  # pylint: disable=g-import-not-at-top
    return load_scorer
  raise AttributeError(f"module 'jaxreward' has no attribute {name!r}")
