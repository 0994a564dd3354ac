"""Scoring (prompt, response) rows with a trained reward model, for the RL stage and for inspection.

  python -m jaxreward.score --model W_or_HF_folder --data FILE --out FILE [--checkpoint best|latest|STEP]
  (the command line is jaxreward.commands.score)

FILE holds `{"prompt", "response"}` rows (prompt: text or a list of {role, content} messages; response:
text or a list of assistant messages), or preference pairs in any of the three training formats (then
both sides are scored). The output is JSONL: each input row plus `reward` and `reward_normalized` (pairs:
`reward_chosen`, `reward_rejected`, their normalised values and `margin`).

Normalised reward = (r − mean) / std with the mean and std of the validation rewards saved at training
(work dir: the checkpoint's row of metrics.jsonl, else metrics.json; HF export: reward_normalization.json),
so the RL stage sees rewards near N(0, 1) on data like the validation split.

In Python (e.g. inside an RL loop):

  from jaxreward import load_scorer
  score = load_scorer("runs/small")                 # best checkpoint; or an exported HF folder
  r_N = score(prompts, responses)                   # raw float32 rewards, shape [N]
  z_N = score(prompts, responses, normalized=True)

Sequences are tokenized exactly as in training (prompt + response + EOS via `tokenizer.encode`; longer
ones keep their end), sorted by length, and padded to a few fixed (rows, length) shapes, so repeated
calls reuse a handful of compiled programs instead of compiling one per call.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from flax import nnx

from jaxreward import artifacts, configuration, data, hf, jsonfile, loss, model as model_lib, pipeline, sharding
from jaxreward import storage
from jaxreward import tokenizer as tokenizer_lib
from jaxreward.configuration import ConfigError

ROW_BUCKETS = (4, 16, 64)  # Rows per compiled batch: a call of 3 sequences does not pay for 64.
CALL_COST = 4  # A batch's fixed cost (dispatch, tokens to device), in rows: row_plan's trade-off.
HF_NUM_BUCKETS = 4


# ---------------------------------------------------------------------------------------------------------------
# Backends: a function from padded token batches to rewards
# ---------------------------------------------------------------------------------------------------------------


class _JaxBackend:
  """A jaxreward model (from a work dir, or from an HF folder through jaxreward.hf) on one device."""

  def __init__(self, model):
    graphdef, params = nnx.split(model, nnx.Param)
    self._params = params
    self._fn = jax.jit(lambda p, tokens_BxL, lengths_B: nnx.merge(graphdef, p)(tokens_BxL, lengths_B))

  def __call__(self, tokens_BxL, lengths_B) -> np.ndarray:
    return np.asarray(self._fn(self._params, tokens_BxL, lengths_B), np.float32)


class _TorchBackend:
  """transformers' *ForSequenceClassification: scores the last token that is not the pad token."""

  def __init__(self, folder: str):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(f"{folder}: scoring an HF folder without jaxreward.hf needs torch ({e})") from None
    self._torch = torch
    self.model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    self.model.eval()

  def __call__(self, tokens_BxL, lengths_B) -> np.ndarray:
    torch = self._torch
    mask = np.arange(tokens_BxL.shape[1])[None, :] < lengths_B[:, None]
    with torch.no_grad():
      logits = self.model(input_ids=torch.from_numpy(tokens_BxL.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
    return logits[:, 0].float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------------------------


class Scorer:
  """callable(prompts, responses, normalized=False) -> float32 rewards [N]."""

  def __init__(self, backend, tokenizer, max_length: int, num_buckets: int, mean: float | None,
               std: float | None, description: str):
    self.backend, self.tokenizer = backend, tokenizer
    self.max_length = max_length
    self.buckets = pipeline.bucket_lengths(max_length, num_buckets)
    self.mean, self.std = mean, std
    self.description = description

  def encode(self, prompts, responses) -> list[np.ndarray]:
    """Token ids as training builds them (keep_end truncation: scoring never drops a row)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    # tokenizer.encode is the single source of truth for tokenization; a pair of (response, response)
    # costs a second tokenization of the response but can never drift from training.
    pairs = [data.Pair(p, r, r) for p, r in (_as_sides(p, r) for p, r in zip(prompts, responses))]
    enc = tokenizer_lib.encode(pairs, self.tokenizer, self.max_length, "keep_end")
    return [sides[0] for sides in enc.ids]

  def score_ids(self, ids: list[np.ndarray]) -> np.ndarray:
    """Rewards of token sequences, in their order; batches are length-sorted and padded to bucket shapes."""
    out = np.zeros(len(ids), np.float32)
    if not ids:
      return out
    lengths = np.array([len(x) for x in ids], np.int32)
    order = np.argsort(lengths, kind="stable")
    pad_id = self.tokenizer.pad_token_id
    start = 0
    for rows in row_plan(len(order)):
      chunk = order[start:start + rows]
      start += len(chunk)
      width = pipeline.smallest_fitting(self.buckets, lengths[chunk].max())
      tokens_BxL = np.full((rows, width), pad_id, np.int32)
      # Filler rows hold one pad token; their rewards are computed and thrown away.
      lengths_B = np.ones(rows, np.int32)
      for row, i in enumerate(chunk):
        tokens_BxL[row, :lengths[i]] = ids[i]
        lengths_B[row] = lengths[i]
      out[chunk] = self.backend(tokens_BxL, lengths_B)[:len(chunk)]
    return out

  def shapes(self) -> list[tuple[int, int]]:
    """Every (rows, length) batch shape score_ids can hand the backend."""
    return [(rows, width) for rows in ROW_BUCKETS for width in self.buckets]

  def warmup(self) -> int:
    """Runs every shape once, so a server compiles before its first request and never while serving."""
    for rows, width in self.shapes():
      self.backend(np.full((rows, width), self.tokenizer.pad_token_id, np.int32), np.ones(rows, np.int32))
    return len(self.shapes())

  def normalize(self, r: np.ndarray) -> np.ndarray:
    if self.mean is None or self.std is None:
      raise ConfigError(f"{self.description}: no saved reward mean/std to normalise with")
    return (np.asarray(r, np.float32) - self.mean) / max(self.std, 1e-8)

  def __call__(self, prompts, responses, normalized: bool = False) -> np.ndarray:
    r = self.score_ids(self.encode(list(prompts), list(responses)))
    return self.normalize(r) if normalized else r


def row_plan(n: int) -> list[int]:
  """Rows of the batches that score n sequences: ROW_BUCKETS sizes covering n at the least cost, a filler row
  costing 1 and a call CALL_COST (30 rows: 16 + 16, not one 64-row batch of which 34 rows are filler)."""
  full, rest = divmod(n, ROW_BUCKETS[-1])
  return [ROW_BUCKETS[-1]] * full + list(_plan_under_max(rest))


@functools.lru_cache(maxsize=None)
def _plan_under_max(n: int) -> tuple[int, ...]:
  if n <= 0:
    return ()
  plans = [(b,) if b >= n else (b,) + _plan_under_max(n - b) for b in ROW_BUCKETS]
  return min(plans, key=lambda plan: (sum(plan) + CALL_COST * len(plan), len(plan)))


def _as_sides(prompt, response):
  """One side as data.py reads it: text after a conversation is one assistant message, and a text prompt
  before a message list is one user message (empty: no prompt message)."""
  if isinstance(prompt, list) and isinstance(response, str):
    return prompt, [{"role": "assistant", "content": response}]
  if isinstance(prompt, str) and isinstance(response, list):
    return ([{"role": "user", "content": prompt}] if prompt else []), response
  return prompt, response


def is_hf_folder(path: str) -> bool:
  """An exported transformers folder: config.json naming a *ForSequenceClassification architecture."""
  cfg_path = storage.join(path, "config.json")
  if not storage.isfile(cfg_path):
    return False
  try:
    cfg = json.loads(storage.read_text(cfg_path))
  except (OSError, json.JSONDecodeError):
    return False
  return any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])


def check_model_path(path: str) -> str:
  """'workdir' or 'hf', or a one-line ConfigError saying what the path is not. A work dir may be remote (any
  etils.epath URL, storage.py); an HF folder must be local (transformers reads it)."""
  if not storage.path(path).exists():
    raise ConfigError(f"{path}: no such file or directory")
  if not storage.isdir(path):
    raise ConfigError(f"{path}: expected a jaxreward work dir or an HF folder, got a file")
  if is_hf_folder(path):
    if storage.is_remote(path):
      raise ConfigError(f"{path}: an exported HF folder is read from a local folder; copy it here first")
    return "hf"
  if storage.isfile(storage.join(path, "config.json")) and storage.isdir(storage.join(path, "checkpoints")):
    return "workdir"
  raise ConfigError(f"{path}: neither a jaxreward work dir (config.json + checkpoints/) nor an HF folder "
                    "(config.json with a *ForSequenceClassification architecture)")


def workdir_reward_stats(workdir: str, step: int) -> tuple[float | None, float | None]:
  """Validation reward mean/std of checkpoint `step`: its eval row in metrics.jsonl, else metrics.json."""
  rows_path = storage.join(workdir, "metrics.jsonl")
  if storage.isfile(rows_path):
    for line in storage.read_text(rows_path).splitlines():
      if line.strip():
        row = json.loads(line)
        if row.get("kind") == "eval" and row.get("step") == step and "val_reward_std" in row:
          return float(row["val_reward_mean"]), float(row["val_reward_std"])
  summary_path = storage.join(workdir, "metrics.json")
  if storage.isfile(summary_path):
    summary = json.loads(storage.read_text(summary_path))
    if "val_reward_mean" in summary:
      return float(summary["val_reward_mean"]), float(summary["val_reward_std"])
  return None, None


def hf_reward_stats(folder: str) -> dict:
  path = os.path.join(folder, "reward_normalization.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    stats = json.load(f)
  for mean_key, std_key in (("mean", "std"), ("val_reward_mean", "val_reward_std"), ("reward_mean", "reward_std")):
    if mean_key in stats and std_key in stats:
      return dict(stats, mean=float(stats[mean_key]), std=float(stats[std_key]))
  return stats


def load_scorer(path: str, checkpoint: str | int = "best", max_length: int | None = None) -> Scorer:
  """A Scorer for a work dir (at `checkpoint`) or an exported HF folder."""
  kind = check_model_path(path)
  if kind == "workdir":
    config = artifacts.read_config(path)
    # One device: scoring batches are small, and RL loops call this from one process.
    loaded = artifacts.load(path, checkpoint, sharding.host_mesh_config(config.mesh.rules, data=1))
    mean, std = workdir_reward_stats(path, loaded.step)
    return Scorer(_JaxBackend(loaded.model), loaded.tokenizer, max_length or config.data.max_length,
                  config.data.num_buckets, mean, std, f"{path} (step {loaded.step})")
  return _load_hf_scorer(path, max_length)


# --- HF folder ------------------------------------------------------------------------------------------------


def _load_hf_scorer(folder: str, max_length: int | None) -> Scorer:
  """jaxreward.hf builds our JAX model from the folder; transformers + torch if that cannot."""
  tok = tokenizer_lib.load(folder)
  stats = hf_reward_stats(folder)
  with open(os.path.join(folder, "config.json")) as f:
    hf_cfg = json.load(f)
  # Our exports record the training max_length as the tokenizer's model_max_length (older ones in
  # reward_normalization.json); else the model's context length. transformers' "no limit" is a huge number.
  recorded = tok.model_max_length if tok.model_max_length < 10**9 else None
  max_length = int(max_length or recorded or stats.get("max_length") or hf_cfg.get("max_position_embeddings") or 2048)
  try:
    backend, how = _JaxBackend(_hf_jax_model(folder)), "jax"
  except Exception as e:  # pylint: disable=broad-except  (any failure of the JAX import path -> torch)
    backend, how = _TorchBackend(folder), f"torch ({type(e).__name__}: {str(e)[:80]})"
  return Scorer(backend, tok, max_length, HF_NUM_BUCKETS, stats.get("mean"), stats.get("std"),
                f"{folder} [{how}]")


def _hf_jax_model(folder: str):
  defaults = configuration.defaults()
  cfg = hf.model_config(folder, defaults.model)
  mesh_cfg = sharding.host_mesh_config(defaults.mesh.rules, data=1)
  mesh, rule_table = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
    model = model_lib.RewardModel(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return nnx.merge(graphdef, hf.load_params(folder, params))


# ---------------------------------------------------------------------------------------------------------------
# Files of rows
# ---------------------------------------------------------------------------------------------------------------


def read_rows(path: str) -> tuple[str, list[dict]]:
  """('responses' | 'pairs', rows). Rows are validated here so a bad line is one message with its number."""
  rows = []
  for number, row in jsonfile.read_rows(path):
    if isinstance(row, jsonfile.BadLine):
      raise ConfigError(f"{path}:{number}: {row}")
    rows.append(row)
  if not rows:
    raise ConfigError(f"{path}: holds no rows")
  kinds = set()
  for number, row in enumerate(rows, 1):
    if not isinstance(row, dict):
      raise ConfigError(f"{path}:{number}: expected a JSON object")
    if "response" in row:
      if "prompt" not in row:
        raise ConfigError(f"{path}:{number}: a 'response' row needs a 'prompt' (may be \"\")")
      kinds.add("responses")
    elif "chosen" in row and "rejected" in row:
      kinds.add("pairs")
    else:
      raise ConfigError(f"{path}:{number}: expected {{\"prompt\", \"response\"}} or a pair with 'chosen' and "
                        f"'rejected'; got keys {sorted(row)[:6]}")
  if len(kinds) > 1:
    raise ConfigError(f"{path}: mixes response rows and pairs; score them in separate files")
  return kinds.pop(), rows


def score_file(scorer: Scorer, path: str) -> tuple[list[dict], dict]:
  kind, rows = read_rows(path)
  can_normalize = scorer.mean is not None and scorer.std is not None
  norm = scorer.normalize if can_normalize else (lambda r: [None] * len(r))
  if kind == "responses":
    for number, row in enumerate(rows, 1):
      for key in ("prompt", "response"):
        if not isinstance(row[key], (str, list)):
          raise ConfigError(f"{path}:{number}: {key!r} must be text or a list of messages")
    r = scorer([row["prompt"] for row in rows], [row["response"] for row in rows])
    z = norm(r)
    out = [dict(row, reward=float(a), reward_normalized=None if b is None else float(b))
           for row, a, b in zip(rows, r, z)]
    all_r = r
  else:
    pairs = []
    for number, row in enumerate(rows, 1):
      try:
        pair, _ = data.parse_row(row, "auto")
      except jsonfile.BadLine as e:
        raise ConfigError(f"{path}:{number}: {e}") from None
      pairs.append(pair)
    prompts = [p.prompt for p in pairs] * 2
    r = scorer(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    r_Nx2 = r.reshape(2, -1).T
    z_Nx2 = np.asarray(norm(r)).reshape(2, -1).T
    out = [dict(row, reward_chosen=float(a[0]), reward_rejected=float(a[1]), margin=float(a[0] - a[1]),
                reward_chosen_normalized=None if b[0] is None else float(b[0]),
                reward_rejected_normalized=None if b[1] is None else float(b[1]))
           for row, a, b in zip(rows, r_Nx2, z_Nx2)]
    all_r = r
  summary = {"rows": len(rows), "kind": kind, "model": scorer.description, "reward_mean": float(np.mean(all_r)),
             "reward_std": float(np.std(all_r)), "normalization": {"mean": scorer.mean, "std": scorer.std}}
  if can_normalize:
    z = scorer.normalize(all_r)
    summary.update(normalized_mean=float(z.mean()), normalized_std=float(z.std()))
  if kind == "pairs":
    diff = r_Nx2[:, 0] - r_Nx2[:, 1]
    summary["accuracy"] = float(np.mean(loss.correct(diff, np)))
  return out, summary


if __name__ == "__main__":
  # `python -m jaxreward.score` predates jaxreward.commands; runpy keeps it working without an import cycle.
  import runpy  # pylint: disable=g-import-not-at-top
  runpy.run_module("jaxreward.commands.score", run_name="__main__", alter_sys=True)
