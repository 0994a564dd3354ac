"""Preference files -> validated `Pair` records (jsonfile.read_rows reads the lines; corpus.py splits).

Three layouts are read, detected per line unless `data.format` fixes one:
- explicit:       {"prompt": str, "chosen": str, "rejected": str}
- implicit:       {"chosen": str, "rejected": str} holding whole HH-RLHF transcripts; the prompt is the
                  shared prefix up to and including the last "\\n\\nAssistant:".
- conversational: {"prompt": [{"role", "content"}...], "chosen": [assistant messages] or str, "rejected": ...}
- ranked:         {"prompt", "responses": [str or messages, ...], "scores": [number, ...]} (higher is better)
                  or "ranking": [int, ...] (1 is best) instead of "scores"; equal values are ties. A line gives
                  one pair per two responses that differ (the edges of its comparison graph); a tied pair is
                  no comparison and is only counted (LoadReport.tie_pairs).
An optional numeric "margin" is kept for the margin loss, and any other field (e.g. "category") is
kept in `Pair.extra` for error analysis. Files may be .jsonl, .jsonl.gz, a .json array (or .json.gz); a
.json file that does not start with "[" is read as JSONL (HF `Dataset.to_json` writes JSONL under .json).
Conversations may also leave out "prompt" (TRL's implicit-prompt layout): the prompt is then the longest
run of leading messages chosen and rejected share. A string prompt next to message-list responses is one
user message.

Empty or whitespace-only texts are bad lines (prompt messages, conversation contents, transcripts, both
responses at once), with one exception: ONE empty response next to a non-empty one is kept and counted,
because "the model said nothing" is a real answer that humans rank (PandaLM: 51 empty rejected and 1 empty
chosen of 894; Auto-J: 1); its reward is read at the EOS right after the prompt. A text prompt may be empty
(ETHICS has none).

A bad line is reported as `file:line: problem` (ConfigError) or, with on_bad_line="skip", counted. A UTF-8
BOM (on any line: concatenated files carry several), CRLF endings and blank lines are accepted silently.
Lines are read with a bounded buffer (jsonfile.py) so an absurdly long line costs little memory, not its size.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

from jaxreward.configuration import ConfigError
from jaxreward.jsonfile import BadLine, read_rows

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_MARK = "\n\nAssistant:"
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
  one_empty: int = 0  # Pairs kept with one empty response.
  tie_pairs: int = 0  # Tied response pairs of ranked lines (no comparison, not trained on).


def _json_type(value) -> str:
  """The JSON name of a parsed value's type, for messages that speak the file's language."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  return {str: "string", int: "number", float: "number", list: "array", dict: "object"}.get(type(value), "value")


def _text(value, key: str, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise BadLine(f"key {key!r} must be a string, got {_json_type(value)}")
  if not value.strip() and not allow_empty:
    raise BadLine(f"key {key!r} is empty or whitespace-only")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    # json.loads accepts "\ud800"; the tokenizer would crash on it much later, without a line number.
    raise BadLine(f"key {key!r} holds an unpaired surrogate escape (\\u{ord(value[e.start]):04x})") from None
  return value


def _messages(value, key: str, assistant_only: bool, allow_empty: bool = False) -> list:
  if isinstance(value, str):
    # A bare string response is one assistant turn; a bare string prompt is one user turn.
    return [{"role": "assistant" if assistant_only else "user", "content": _text(value, key, allow_empty)}]
  if not isinstance(value, list) or not value:
    got = "an empty array" if value == [] else _json_type(value)
    raise BadLine(f"key {key!r} must be a non-empty array of {{role, content}} messages, got {got}")
  out = []
  for i, msg in enumerate(value):
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
      raise BadLine(f"{key}[{i}] must be an object with 'role' and 'content'")
    if msg["role"] not in ROLES:
      raise BadLine(f"{key}[{i}] has unknown role {msg['role']!r}; expected one of {', '.join(ROLES)}")
    if assistant_only and msg["role"] != "assistant":
      raise BadLine(f"{key}[{i}] has role {msg['role']!r}; responses must be assistant messages")
    out.append({"role": msg["role"], "content": _text(msg["content"], f"{key}[{i}].content", allow_empty)})
  return out


def split_conversation(chosen: list, rejected: list) -> tuple[list, list, list]:
  """Implicit-prompt conversations: the prompt is the longest run of leading messages both sides share."""
  shared = 0
  while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
    shared += 1
  # Each response must keep at least one message (one side may extend the other): give back shared turns.
  while shared and (shared == len(chosen) or shared == len(rejected)):
    shared -= 1
  if not shared:
    raise BadLine("conversation without 'prompt': chosen and rejected share no leading message")
  prompt, chosen_tail, rejected_tail = chosen[:shared], chosen[shared:], rejected[shared:]
  for i, msg in enumerate(prompt):
    if not msg["content"].strip():
      raise BadLine(f"chosen[{i}].content (part of the shared prompt) is empty or whitespace-only")
  for key, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
    for msg in tail:
      if msg["role"] != "assistant":
        raise BadLine(f"{key}: after the shared prompt, message with role {msg['role']!r}; responses must be "
                      "assistant messages")
  return prompt, chosen_tail, rejected_tail


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
  """HH-RLHF: prompt = shared prefix through the last '\\n\\nAssistant:' that both transcripts share."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(ASSISTANT_MARK)
  if cut < 0:
    raise BadLine("implicit format: chosen and rejected share no '\\n\\nAssistant:' turn")
  cut += len(ASSISTANT_MARK)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def response_text(response) -> str:
  return response if isinstance(response, str) else "".join(m["content"] for m in response)


def detect_format(row: dict) -> str:
  if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
    return "conversational"
  if "prompt" not in row:
    return "implicit"
  if row["prompt"] == "" and all(isinstance(row.get(k), str) and ASSISTANT_MARK in row[k]
                                 for k in ("chosen", "rejected")):
    return "implicit"  # HH-RLHF exported with an empty "prompt" column.
  return "explicit"


def parse_row(row, fmt: str) -> tuple[Pair, str]:
  """One parsed JSON value -> (Pair, format); raises BadLine naming the problem."""
  if not isinstance(row, dict):
    raise BadLine(f"expected a JSON object, got {_json_type(row)}")
  for key in ("chosen", "rejected"):
    if key not in row:
      raise BadLine(f"missing key {key!r} (keys present: {', '.join(sorted(row)) or 'none'})")
  kind = detect_format(row) if fmt == "auto" else fmt
  lists = isinstance(row["chosen"], list) and isinstance(row["rejected"], list)
  if kind == "implicit" and lists:
    kind = "conversational"  # TRL's implicit prompt with message lists.
  if kind == "explicit":
    if "prompt" not in row:
      raise BadLine("missing key 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
      raise BadLine(f"key 'prompt' must be a string, got {_json_type(prompt)}")
    chosen = _text(row["chosen"], "chosen", allow_empty=True)
    rejected = _text(row["rejected"], "rejected", allow_empty=True)
  elif kind == "implicit":
    if "prompt" in row and fmt == "implicit" and row["prompt"] not in ("", None):
      raise BadLine("data.format=implicit but the line has a non-empty 'prompt'")
    prompt, chosen, rejected = split_transcript(_text(row["chosen"], "chosen"), _text(row["rejected"], "rejected"))
    if not chosen.strip() and not rejected.strip():
      raise BadLine("both responses are empty after the shared prompt")
  elif "prompt" in row:
    prompt = _messages(row["prompt"], "prompt", assistant_only=False)
    chosen = _messages(row["chosen"], "chosen", assistant_only=True, allow_empty=True)
    rejected = _messages(row["rejected"], "rejected", assistant_only=True, allow_empty=True)
  else:
    if not lists:
      raise BadLine("conversation without 'prompt': chosen and rejected must both be message arrays")
    prompt, chosen, rejected = split_conversation(
        _messages(row["chosen"], "chosen", assistant_only=False, allow_empty=True),
        _messages(row["rejected"], "rejected", assistant_only=False, allow_empty=True))
  if chosen == rejected:
    raise BadLine("chosen is identical to rejected")
  if not response_text(chosen).strip() and not response_text(rejected).strip():
    raise BadLine("chosen and rejected are both empty or whitespace-only")
  margin = row.get("margin", 0.0)
  if margin is None:
    margin = 0.0  # Exports from pandas write null for a missing margin.
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
    raise BadLine(f"key 'margin' must be a finite number, got {margin!r}")
  extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
  return Pair(prompt, chosen, rejected, float(margin), extra), kind


def parse_ranked(row: dict) -> tuple[list[Pair], int]:
  """A ranked line -> (its pairs, better response first, in response order; the number of tied pairs)."""
  if "prompt" not in row:
    raise BadLine("missing key 'prompt'")
  conversational = isinstance(row["prompt"], list)
  responses = row["responses"]
  if not isinstance(responses, list) or len(responses) < 2:
    raise BadLine(f"key 'responses' must be an array of at least 2 responses, got {_json_type(responses)}"
                  + (f" of {len(responses)}" if isinstance(responses, list) else ""))
  keys = [k for k in ("scores", "ranking") if k in row]
  if len(keys) != 1:
    raise BadLine("a ranked line needs exactly one of 'scores' (higher is better) or 'ranking' (1 is best)")
  key, values = keys[0], row[keys[0]]
  if not isinstance(values, list) or len(values) != len(responses):
    raise BadLine(f"key {key!r} must be an array of {len(responses)} numbers (one per response), got "
                  f"{_json_type(values)}" + (f" of {len(values)}" if isinstance(values, list) else ""))
  for i, v in enumerate(values):
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not number or (key == "ranking" and (not isinstance(v, int) or v < 1)):
      raise BadLine(f"{key}[{i}] must be a {'finite number' if key == 'scores' else 'rank >= 1'}, got {v!r}")
  if conversational or any(isinstance(r, list) for r in responses):
    prompt = _messages(row["prompt"], "prompt", assistant_only=False)
    parsed = [_messages(r, f"responses[{i}]", assistant_only=True, allow_empty=True) for i, r in enumerate(responses)]
  else:
    if not isinstance(row["prompt"], str):
      raise BadLine(f"key 'prompt' must be a string or an array of messages, got {_json_type(row['prompt'])}")
    prompt = row["prompt"]
    parsed = [_text(r, f"responses[{i}]", allow_empty=True) for i, r in enumerate(responses)]
  empty = [i for i, r in enumerate(parsed) if not response_text(r).strip()]
  if len(empty) > 1:
    raise BadLine(f"responses {empty[0]} and {empty[1]} are both empty or whitespace-only")
  for i in range(len(parsed)):
    if parsed[i] in parsed[:i]:
      raise BadLine(f"responses[{i}] repeats responses[{parsed.index(parsed[i])}]")
  better = (lambda a, b: a > b) if key == "scores" else (lambda a, b: a < b)
  extra = {k: v for k, v in row.items() if k not in ("prompt", "responses", "scores", "ranking")}
  pairs, ties = [], 0
  for i in range(len(parsed)):
    for j in range(i + 1, len(parsed)):
      if values[i] == values[j]:
        ties += 1
        continue
      win, lose = (i, j) if better(values[i], values[j]) else (j, i)
      pairs.append(Pair(prompt, parsed[win], parsed[lose], 0.0, dict(extra)))
  if not pairs:
    raise BadLine(f"every response has the same {key[:-1] if key == 'scores' else key}: no comparison")
  return pairs, ties


def load_pairs(path: str, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Pair], LoadReport]:
  """Reads one preference file; every problem is a one-line ConfigError naming `file:line` (or is skipped)."""
  report, pairs = LoadReport(path=path), []
  for number, row in read_rows(path):
    where = f"{path}:{number}"
    report.lines += 1
    try:
      if isinstance(row, BadLine):
        raise row
      if fmt == "ranked" or (fmt == "auto" and isinstance(row, dict) and "responses" in row):
        if not isinstance(row, dict) or "responses" not in row:
          raise BadLine("data.format=ranked but the line has no 'responses'" if isinstance(row, dict) else
                        f"expected a JSON object, got {_json_type(row)}")
        (line_pairs, ties), kind = parse_ranked(row), "ranked"
      else:
        (pair, kind), ties = parse_row(row, fmt), 0
        line_pairs = [pair]
    except BadLine as e:
      if on_bad_line == "error":
        raise ConfigError(f"data: {where}: {e} (set data.on_bad_line=skip to skip such lines)") from None
      report.skipped += 1
      if len(report.skip_reasons) < SHOWN_SKIP_REASONS:
        report.skip_reasons.append(f"{where}: {e}")
      continue
    report.formats[kind] += 1
    report.tie_pairs += ties
    for pair in line_pairs:
      pair.where = where
      report.one_empty += not (response_text(pair.chosen).strip() and response_text(pair.rejected).strip())
      pairs.append(pair)
  if report.lines == 0:
    raise ConfigError(f"data: {path}: the file is empty (no pairs)")
  if not pairs:
    raise ConfigError(f"data: {path}: no usable pair among {report.lines} lines "
                      f"(first problems: {'; '.join(report.skip_reasons[:2])})")
  report.pairs = len(pairs)
  return pairs, report
