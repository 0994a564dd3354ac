"""The reward server's wire formats: request bodies checked into rows, and OpenRLHF's queries split.

Every way a body can be wrong is a `BadRequest` with an HTTP status and one line naming the place
(`rows[3].response[0].content: expected a string, got number`): 400 for a body that is not JSON, 422 for
JSON of the wrong shape, 413 for a request over the server's `Limits`.

/get_reward (OpenRLHF): each query is the policy's decoded prompt + response, possibly with pad tokens at
either end and EOS at the end. `QuerySplitter` strips the pad and EOS texts of the reward model's tokenizer
from the ends (and a leading BOS text, which tokenization adds back). When `prompts[i]` is given and the
query starts with it, the row is (prompt, rest); otherwise the whole query is one text with an empty prompt.
Either way the row is scored exactly as training scores that text: training tokenizes prompt + response as
one string (tokenizer.encode), so where the split falls changes no token.
"""

from __future__ import annotations

import dataclasses
import json

from jaxreward import tokenizer as tokenizer_lib

ROLE_CONTENT = "a non-empty list of {\"role\", \"content\"} messages"


class BadRequest(ValueError):
  """A request the server refuses: `status` (4xx) and a one-line message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  max_body_bytes: int = 32 << 20
  max_rows: int = 1024  # Rows per request.
  max_chars: int = 200_000  # Characters per row (prompt + response); longer rows are refused, not truncated.


def _bad(where: str, what: str) -> BadRequest:
  return BadRequest(422, f"{where}: {what}")


def _type_name(value) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  return {str: "string", int: "number", float: "number", list: "array", dict: "object"}.get(type(value), "value")


def _text(value, where: str) -> str:
  if not isinstance(value, str):
    raise _bad(where, f"expected a string, got {_type_name(value)}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise _bad(where, "holds an unpaired surrogate escape") from None
  return value


def _side(value, where: str):
  """Text, or a non-empty list of {role, content} messages (other message keys are dropped)."""
  if isinstance(value, str):
    return _text(value, where)
  if not isinstance(value, list) or not value:
    raise _bad(where, f"expected a string or {ROLE_CONTENT}, got "
               f"{'an empty array' if value == [] else _type_name(value)}")
  messages = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise _bad(f"{where}[{i}]", "expected an object with \"role\" and \"content\"")
    messages.append({"role": _text(m["role"], f"{where}[{i}].role"),
                     "content": _text(m["content"], f"{where}[{i}].content")})
  return messages


def _list(body: dict, key: str, limits: Limits, required: bool = True) -> list | None:
  value = body.get(key)
  if value is None and not required:
    return None
  if key not in body:
    raise _bad("body", f"missing key {key!r}")
  if not isinstance(value, list):
    raise _bad(key, f"expected an array, got {_type_name(value)}")
  if not value:
    raise _bad(key, "is an empty array")
  if len(value) > limits.max_rows:
    raise BadRequest(413, f"{key}: {len(value)} rows; at most {limits.max_rows} per request (--max_rows)")
  return value


def _chars(side) -> int:
  return len(side) if isinstance(side, str) else sum(len(m["content"]) for m in side)


def _check_chars(where: str, n: int, limits: Limits) -> None:
  if n > limits.max_chars:
    raise BadRequest(413, f"{where}: {n} characters; at most {limits.max_chars} per row (--max_chars)")


def parse_json(raw: bytes):
  try:
    return json.loads(raw)
  except json.JSONDecodeError as e:
    raise BadRequest(400, f"body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except UnicodeDecodeError:
    raise BadRequest(400, "body is not UTF-8 JSON") from None


def parse_score(body, limits: Limits) -> tuple[list, list]:
  """/score body -> (prompts, responses)."""
  if not isinstance(body, dict):
    raise _bad("body", f"expected a JSON object with \"rows\", got {_type_name(body)}")
  prompts, responses = [], []
  for i, row in enumerate(_list(body, "rows", limits)):
    if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
      raise _bad(f"rows[{i}]", "expected an object with \"prompt\" and \"response\"")
    prompts.append(_side(row["prompt"], f"rows[{i}].prompt"))
    responses.append(_side(row["response"], f"rows[{i}].response"))
    _check_chars(f"rows[{i}]", _chars(prompts[-1]) + _chars(responses[-1]), limits)
  return prompts, responses


def parse_get_reward(body, limits: Limits) -> tuple[list, list | None]:
  """/get_reward body -> (queries, prompts or None); other keys (labels, ...) are OpenRLHF's and ignored."""
  if not isinstance(body, dict):
    raise _bad("body", f"expected a JSON object with \"query\", got {_type_name(body)}")
  queries = [_text(q, f"query[{i}]") for i, q in enumerate(_list(body, "query", limits))]
  prompts = _list(body, "prompts", limits, required=False)
  if prompts is not None:
    prompts = [_text(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if len(prompts) != len(queries):
      raise _bad("prompts", f"{len(prompts)} prompts for {len(queries)} queries")
  for i, q in enumerate(queries):
    _check_chars(f"query[{i}]", len(q), limits)
  return queries, prompts


class QuerySplitter:
  """OpenRLHF's decoded sequences -> (prompt, response) as training encodes them (see the module docstring)."""

  def __init__(self, tok):
    self.pad, self.eos = tok.pad_token or "", tok.eos_token or ""
    self.leading = tok.decode(tokenizer_lib.leading_special_ids(tok))

  def _clean(self, text: str, tail: bool) -> str:
    while self.pad and text.startswith(self.pad):
      text = text[len(self.pad):]
    if self.leading and text.startswith(self.leading):
      text = text[len(self.leading):]  # Tokenizing a text prompt adds it back.
    while tail:
      before = text
      for token in (self.pad, self.eos):
        if token and text.endswith(token):
          text = text[:-len(token)]
      tail = text != before
    return text

  def __call__(self, query: str, prompt: str | None) -> tuple[str, str]:
    query = self._clean(query, tail=True)
    if prompt is not None:
      prompt = self._clean(prompt, tail=False)
      if prompt and query.startswith(prompt):
        return prompt, query[len(prompt):]
    return "", query
