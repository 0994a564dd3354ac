"""A jaxreward model as a TRL reward function (`reward_funcs` of GRPOTrainer, RLOOTrainer and the like).

  from jaxreward import reward_fn
  trainer = GRPOTrainer(model=..., reward_funcs=reward_fn("runs/small"), ...)

TRL calls `f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **dataset_columns)` and
wants one float per completion; it names the function's column in its logs `f.__name__` (here
"jaxreward_<model folder name>" unless `name` is given). Standard data: prompts and completions are text and
the scored text is prompt + completion + EOS, as training scores a text pair. Conversational data: prompts
are message lists and completions lists of assistant messages, rendered with the reward model's chat template
(or the plain template) exactly as training renders conversations. Other keyword arguments are ignored.

The scorer batches into fixed shapes, so GRPO's steady groups of `num_generations` completions reuse a few
compiled programs. The function pickles as its arguments (the model is loaded again where it is unpickled).
"""

from __future__ import annotations

import os

from jaxreward.score import load_scorer
from jaxreward.configuration import ConfigError


class RewardFunction:
  """(prompts, completions, **kwargs) -> list[float], one reward per completion."""

  def __init__(self, path: str, checkpoint: str | int = "best", normalized: bool = False,
               max_length: int | None = None, name: str | None = None):
    self._args = (path, checkpoint, normalized, max_length, name)
    self.scorer = load_scorer(path, checkpoint, max_length)
    if normalized and (self.scorer.mean is None or self.scorer.std is None):
      raise ConfigError(f"{path}: normalized=True needs the validation reward mean/std saved at training; "
                        "none found")
    self.normalized = normalized
    self.__name__ = name or "jaxreward_" + os.path.basename(os.path.normpath(path))

  def __call__(self, prompts, completions, **kwargs) -> list[float]:
    del kwargs  # completion_ids, trainer_state, log_extra, dataset columns: the text is what is scored.
    if len(prompts) != len(completions):
      raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
    return self.scorer(prompts, completions, normalized=self.normalized).tolist()

  def __reduce__(self):
    return RewardFunction, self._args

  def __repr__(self):
    return f"RewardFunction({self.scorer.description}, normalized={self.normalized})"


def reward_fn(path: str, checkpoint: str | int = "best", normalized: bool = False, max_length: int | None = None,
              name: str | None = None) -> RewardFunction:
  """A TRL reward function for a jaxreward work dir (at `checkpoint`) or an exported HF folder.

  normalized=True returns (r - mean) / std with the validation statistics saved at training.
  """
  return RewardFunction(path, checkpoint, normalized, max_length, name)
