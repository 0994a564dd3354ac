"""Preference files -> validated `Pair` records, and the train/validation split.

Three layouts are read, detected per line unless `data.format` fixes one:
- explicit:       {"prompt": str, "chosen": str, "rejected": str}
- implicit:       {"chosen": str, "rejected": str} holding whole HH-RLHF transcripts; the prompt is the
                  shared prefix up to and including the last "\\n\\nAssistant:".
- conversational: {"prompt": [{"role", "content"}...], "chosen": [assistant messages] or str, "rejected": ...}
An optional numeric "margin" is kept for the margin loss, and any other field (e.g. "category") is
kept in `Pair.extra` for error analysis. Files may be .jsonl, .jsonl.gz or a .json array.

A bad line is reported as `file:line: problem` (ConfigError) or, with on_bad_line="skip", counted.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os

from jaxreward.configuration import ConfigError

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_MARK = "\n\nAssistant:"
MAX_LINE_BYTES = 8 << 20  # A line longer than this is not a preference pair but a broken file.
SHOWN_SKIP_REASONS = 5


@dataclasses.dataclass
class Pair:
  prompt: str | list  # Text, or a list of {"role","content"} messages.
  chosen: str | list  # Text, or a list of assistant messages.
  rejected: str | list
  margin: float = 0.0
  extra: dict = dataclasses.field(default_factory=dict)
  where: str = ""  # "file:line", for messages.

  def key(self) -> str:
    """Identity used for de-duplication."""
    return json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)

  def prompt_key(self) -> str:
    """Split group: pairs sharing a prompt stay on one side. Without a prompt each pair is its own group."""
    if self.prompt in ("", []):
      return "pair:" + self.key()
    return "prompt:" + json.dumps(self.prompt, ensure_ascii=False, sort_keys=True)


@dataclasses.dataclass
class LoadReport:
  path: str
  lines: int = 0
  pairs: int = 0
  skipped: int = 0
  skip_reasons: list = dataclasses.field(default_factory=list)
  formats: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class BadLine(Exception):
  pass


def _text(value, key: str) -> str:
  if not isinstance(value, str):
    raise BadLine(f"key {key!r} must be a string, got {type(value).__name__}")
  if not value.strip():
    raise BadLine(f"key {key!r} is empty")
  return value


def _messages(value, key: str, assistant_only: bool) -> list:
  if isinstance(value, str):
    return [{"role": "assistant", "content": _text(value, key)}]
  if not isinstance(value, list) or not value:
    raise BadLine(f"key {key!r} must be a non-empty list of {{role, content}} messages")
  out = []
  for i, msg in enumerate(value):
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
      raise BadLine(f"{key}[{i}] must be an object with 'role' and 'content'")
    if msg["role"] not in ROLES:
      raise BadLine(f"{key}[{i}] has unknown role {msg['role']!r}; expected one of {', '.join(ROLES)}")
    if assistant_only and msg["role"] != "assistant":
      raise BadLine(f"{key}[{i}] has role {msg['role']!r}; responses must be assistant messages")
    out.append({"role": msg["role"], "content": _text(msg["content"], f"{key}[{i}].content")})
  return out


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
  """HH-RLHF: prompt = shared prefix through the last '\\n\\nAssistant:' that both transcripts share."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(ASSISTANT_MARK)
  if cut < 0:
    raise BadLine("implicit format: chosen and rejected share no '\\n\\nAssistant:' turn")
  cut += len(ASSISTANT_MARK)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def detect_format(row: dict) -> str:
  if "prompt" not in row:
    return "implicit"
  if isinstance(row["prompt"], list) or isinstance(row.get("chosen"), list):
    return "conversational"
  return "explicit"


def parse_row(row, fmt: str) -> tuple[Pair, str]:
  if not isinstance(row, dict):
    raise BadLine(f"expected a JSON object, got {type(row).__name__}")
  for key in ("chosen", "rejected"):
    if key not in row:
      raise BadLine(f"missing key {key!r}")
  kind = detect_format(row) if fmt == "auto" else fmt
  if kind == "explicit":
    if "prompt" not in row:
      raise BadLine("missing key 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
      raise BadLine(f"key 'prompt' must be a string, got {type(prompt).__name__}")
    chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
  elif kind == "implicit":
    prompt, chosen, rejected = split_transcript(_text(row["chosen"], "chosen"), _text(row["rejected"], "rejected"))
    _text(chosen, "chosen (after the shared prompt)"), _text(rejected, "rejected (after the shared prompt)")
  else:
    if "prompt" not in row:
      raise BadLine("missing key 'prompt'")
    prompt = _messages(row["prompt"], "prompt", assistant_only=False)
    chosen = _messages(row["chosen"], "chosen", assistant_only=True)
    rejected = _messages(row["rejected"], "rejected", assistant_only=True)
  if chosen == rejected:
    raise BadLine("chosen is identical to rejected")
  margin = row.get("margin", 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
    raise BadLine(f"key 'margin' must be a number, got {margin!r}")
  extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
  return Pair(prompt, chosen, rejected, float(margin), extra), kind


def _lines(path: str):
  """Yields (line_number, raw bytes) of a JSONL file, or (index, object) of a JSON array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    if path.endswith(".json"):
      raw = f.read()
      try:
        rows = json.loads(raw.decode("utf-8-sig"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"data: {path}: not a valid JSON array ({e})") from None
      if not isinstance(rows, list):
        raise ConfigError(f"data: {path}: a .json file must hold an array of pairs")
      for i, row in enumerate(rows, 1):
        yield i, row
      return
    for i, line in enumerate(f, 1):
      yield i, line


def load_pairs(path: str, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Pair], LoadReport]:
  if not os.path.exists(path):
    raise ConfigError(f"data: {path}: no such file")
  if os.path.isdir(path):
    raise ConfigError(f"data: {path}: is a directory, expected a JSONL file")
  report, pairs = LoadReport(path=path), []
  try:
    for number, raw in _lines(path):
      where = f"{path}:{number}"
      try:
        if isinstance(raw, bytes):
          if len(raw) > MAX_LINE_BYTES:
            raise BadLine(f"line is {len(raw):,} bytes; longer than {MAX_LINE_BYTES:,}")
          try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
          except UnicodeDecodeError as e:
            raise BadLine(f"not UTF-8 (byte {e.start})") from None
          if not text.strip():
            continue  # Blank lines (and trailing CR/LF) are layout, not data.
          report.lines += 1
          try:
            row = json.loads(text)
          except json.JSONDecodeError as e:
            raise BadLine(f"invalid JSON ({e.msg} at column {e.colno})") from None
        else:
          report.lines += 1
          row = raw
        pair, kind = parse_row(row, fmt)
      except BadLine as e:
        if on_bad_line == "error":
          raise ConfigError(f"data: {where}: {e} (set data.on_bad_line=skip to skip such lines)") from None
        report.skipped += 1
        if len(report.skip_reasons) < SHOWN_SKIP_REASONS:
          report.skip_reasons.append(f"{where}: {e}")
        continue
      pair.where = where
      report.formats[kind] += 1
      pairs.append(pair)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise ConfigError(f"data: {path}: cannot read ({e})") from None
  if report.lines == 0:
    raise ConfigError(f"data: {path}: the file holds no pairs")
  if not pairs:
    raise ConfigError(f"data: {path}: no usable pair among {report.lines} lines "
                      f"(first problems: {'; '.join(report.skip_reasons[:2])})")
  report.pairs = len(pairs)
  return pairs, report


def deduplicate(pairs: list[Pair]) -> tuple[list[Pair], int]:
  seen, out = set(), []
  for pair in pairs:
    k = pair.key()
    if k not in seen:
      seen.add(k)
      out.append(pair)
  return out, len(pairs) - len(out)


def _rank(key: str, seed: int) -> str:
  return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
  """Deterministic split grouped by prompt: the first `fraction` of prompt groups in seeded-hash order."""
  groups = collections.defaultdict(list)
  for pair in pairs:
    groups[pair.prompt_key()].append(pair)
  order = sorted(groups, key=lambda k: _rank(k, seed))
  target, validation, train = fraction * len(pairs), [], []
  for k in order:
    (validation if len(validation) < target else train).extend(groups[k])
  return train, validation


def remove_leaks(train: list[Pair], validation: list[Pair]) -> tuple[list[Pair], int]:
  """Drops training pairs whose prompt group also occurs in validation (explicit validation files)."""
  held_out = {p.prompt_key() for p in validation}
  kept = [p for p in train if p.prompt_key() not in held_out]
  return kept, len(train) - len(kept)
