"""JSON / JSONL files read row by row with their line numbers: the one reader of preference and scoring files.

`read_rows(path)` yields (line number, parsed value or BadLine) for each non-blank line of a .jsonl file, or each
element of a .json array (numbered by the line it starts on); .gz for either. A problem with one line is a
`BadLine` value for the caller's bad-line policy; a problem with the whole file is a one-line ConfigError.
Lines are read with a bounded buffer so an absurdly long line costs MAX_LINE_BYTES of memory, not its size.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib

from jaxreward.configuration import ConfigError

MAX_LINE_BYTES = 8 << 20  # A line longer than this is not a preference pair but a broken file.


class BadLine(Exception):
  pass


def _decode_json(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    # Bare-CR line endings (classic Mac exports) make one line of the whole file: say so.
    hint = "; the lines seem to end with a bare CR: convert them to LF" if "\r" in text.strip() else ""
    raise BadLine(f"invalid JSON ({e.msg} at column {e.colno}){hint}") from None
  except RecursionError:
    raise BadLine("invalid JSON (nested too deeply)") from None
  except ValueError as e:  # e.g. an integer of more than 4300 digits.
    raise BadLine(f"invalid JSON ({e})") from None


def _read_lines(f):
  """Yields (line_number, bytes or BadLine) with at most MAX_LINE_BYTES of any line in memory."""
  number = 0
  while True:
    line = f.readline(MAX_LINE_BYTES + 1)
    if not line:
      return
    number += 1
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
      size = len(line)
      while line and not line.endswith(b"\n"):  # Skip the rest of the line in bounded chunks.
        line = f.readline(1 << 20)
        size += len(line)
      yield number, BadLine(f"line is {size:,} bytes; longer than the {MAX_LINE_BYTES:,} a pair may take")
      continue
    yield number, line


def _json_array(path: str, raw: bytes):
  """Yields (line_number, element) of a JSON array, numbering each element by the line it starts on."""
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise ConfigError(f"data: {path}:{line}: not UTF-8 (byte {e.start}); a .json array cannot skip it") from None
  decoder, pos, line, counted = json.JSONDecoder(), 0, 1, 0

  def skip_space(i):
    while i < len(text) and text[i] in " \t\r\n":
      i += 1
    return i

  def line_of(i):
    nonlocal line, counted
    line += text.count("\n", counted, i)
    counted = i
    return line

  pos = skip_space(pos)
  if text[pos:pos + 1] != "[":
    raise ConfigError(f"data: {path}: a .json file must hold an array of pairs")
  pos = skip_space(pos + 1)
  if text[pos:pos + 1] == "]":
    return
  while True:
    where = line_of(pos)
    try:
      row, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise ConfigError(f"data: {path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); a .json array "
                        "cannot be read past a syntax error") from None
    except (RecursionError, ValueError) as e:
      raise ConfigError(f"data: {path}:{where}: invalid JSON ({e or 'nested too deeply'})") from None
    yield where, row
    pos = skip_space(pos)
    if text[pos:pos + 1] == "]":
      if skip_space(pos + 1) != len(text):
        raise ConfigError(f"data: {path}:{line_of(skip_space(pos + 1))}: text after the closing ']'")
      return
    if text[pos:pos + 1] != ",":
      raise ConfigError(f"data: {path}:{line_of(pos)}: expected ',' or ']' between array elements")
    pos = skip_space(pos + 1)


def _lines(path: str):
  """Yields (line_number, raw bytes | BadLine) of a JSONL file, or (line_number, object) of a JSON array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    if path.removesuffix(".gz").endswith(".json"):
      raw = f.read()
      if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        yield from _json_array(path, raw)
        return
      try:
        whole = json.loads(raw.decode("utf-8-sig"))
      except (ValueError, RecursionError):
        whole = None  # Not one JSON document: JSONL under a .json name, read line by line below.
      if isinstance(whole, dict) and "chosen" not in whole:
        raise ConfigError(f"data: {path}: a .json file must hold an array of pairs (or one pair per line); this "
                          f"one is a single object with keys {', '.join(sorted(whole))[:200]}")
      for number, line in enumerate(raw.splitlines(keepends=True), 1):
        too_long = len(line) > MAX_LINE_BYTES
        yield number, BadLine(f"line is {len(line):,} bytes; longer than {MAX_LINE_BYTES:,}") if too_long else line
      return
    yield from _read_lines(f)


def read_rows(path: str):
  """Yields (line number, JSON value or BadLine) for each non-blank line of a JSONL file, or each element of a
  JSON array (.json; .gz for either): the one reader of preference and scoring files. A missing, unreadable or
  UTF-16 file is a one-line ConfigError."""
  if not os.path.exists(path):
    raise ConfigError(f"data: {path}: no such file")
  if os.path.isdir(path):
    raise ConfigError(f"data: {path}: is a directory, expected a JSONL file")
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      head = f.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):
      # PowerShell's `>` and some Windows editors write UTF-16: one clear message instead of a bad line 1.
      raise ConfigError(f"data: {path}:1: the file is UTF-16 encoded; save it as UTF-8")
    for number, raw in _lines(path):
      if isinstance(raw, bytes):
        try:
          # utf-8-sig on every line: a BOM may start any line of concatenated files.
          text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
          yield number, BadLine(f"not UTF-8 (byte {e.start} of the line: {raw[e.start:e.start + 4]!r})")
          continue
        if not text.strip():
          continue  # Blank lines (and trailing CR/LF) are layout, not data.
        try:
          raw = _decode_json(text)
        except BadLine as e:
          raw = e
      yield number, raw
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise ConfigError(f"data: {path}: cannot read ({type(e).__name__}: {e})") from None
