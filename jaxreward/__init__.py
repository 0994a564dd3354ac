"""jaxreward: reward-model training for RLHF in JAX.

`jaxreward.load_scorer(path, checkpoint="best")` returns a callable (prompts, responses) -> rewards, and
`jaxreward.reward_fn(path)` a TRL reward function (prompts, completions, **kwargs) -> list[float]; both are
imported on first use so that `import jaxreward` stays cheap (no JAX, no transformers).
"""


def __getattr__(name):
  # Deferred imports of our own modules: they pull in JAX and transformers.
  if name == "load_scorer":
    from jaxreward.score import load_scorer  # pylint: disable=g-import-not-at-top
    return load_scorer
  if name == "reward_fn":
    from jaxreward.reward_function import reward_fn  # pylint: disable=g-import-not-at-top
    return reward_fn
  raise AttributeError(f"module 'jaxreward' has no attribute {name!r}")
