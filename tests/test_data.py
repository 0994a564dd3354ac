"""data.py: the three formats, and every kind of bad input as a one-line `file:line` error or a counted skip."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, xla_flags
from jaxreward import data, jsonfile
from jaxreward.configuration import ConfigError

GOOD = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


def write(tmp_path, name, content) -> str:
  path = tmp_path / name
  if isinstance(content, list):  # Rows -> JSONL.
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content)
  path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
  return str(path)


# --- formats ------------------------------------------------------------------------------------------------


def test_explicit_keeps_margin_and_extra_fields(tmp_path):
  path = write(tmp_path, "a.jsonl", [dict(GOOD, margin=2, category="x"), {"prompt": "", "chosen": "a", "rejected": "b"}])
  pairs, rep = data.load_pairs(path)
  assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected, pairs[0].margin) == ("Q?", "yes", "no", 2.0)
  assert pairs[0].extra == {"category": "x"} and pairs[0].where == f"{path}:1"
  assert pairs[1].prompt == "" and rep.formats == {"explicit": 2}


def test_ranked_line_gives_every_untied_pair_better_first(tmp_path):
  rows = [{"prompt": "Q?", "responses": ["a", "b", "c", "d"], "scores": [0.5, 2, 0.5, -1], "category": "x"},
          {"prompt": [{"role": "user", "content": "hi"}], "responses": ["x", [ASSISTANT]], "ranking": [2, 1]}]
  pairs, rep = data.load_pairs(write(tmp_path, "r.jsonl", rows))
  assert [(p.chosen, p.rejected) for p in pairs[:5]] == [("b", "a"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
  assert rep.tie_pairs == 1 and rep.formats == {"ranked": 2} and rep.pairs == 6
  assert pairs[0].extra == {"category": "x"} and pairs[4].where.endswith(":1") and pairs[5].where.endswith(":2")
  assert pairs[5].chosen == [ASSISTANT] and pairs[5].rejected == [{"role": "assistant", "content": "x"}]


def test_implicit_prompt_is_shared_prefix_through_last_assistant_turn(tmp_path):
  head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
  # Also when exported with an empty "prompt" column.
  path = write(tmp_path, "a.jsonl", [{"chosen": head + " well", "rejected": head + " badly"},
                                     {"prompt": "", "chosen": head + " well", "rejected": head + " so-so"}])
  pairs, rep = data.load_pairs(path)
  assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (head, " well", " badly")
  assert (pairs[1].prompt, pairs[1].rejected) == (head, " so-so")
  assert rep.formats == {"implicit": 2}


def test_conversational_layouts(tmp_path):
  user = {"role": "user", "content": "hi"}
  rows = [
      {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
      # A string prompt beside message responses is one user message.
      {"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                       "content": "b"}]},
      # TRL's implicit prompt: whole conversations, the shared leading messages are the prompt.
      {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user, {"role": "assistant",
                                                                                   "content": "b"}]},
  ]
  pairs, rep = data.load_pairs(write(tmp_path, "c.jsonl", rows))
  assert rep.formats == {"conversational": 3}
  for pair in pairs:
    assert pair.prompt == [user]
    assert pair.chosen == [{"role": "assistant", "content": "a"}]
    assert pair.rejected == [{"role": "assistant", "content": "b"}]


def test_format_override_rejects_other_layouts(tmp_path):
  path = write(tmp_path, "a.jsonl", [{"chosen": "x", "rejected": "y"}])
  with pytest.raises(ConfigError, match=r"a\.jsonl:1: missing key 'prompt'"):
    data.load_pairs(path, fmt="explicit")


def test_one_empty_response_is_kept_and_counted(tmp_path):
  # PandaLM ranks empty model outputs; the empty side is a real answer, read at EOS after the prompt.
  pairs, rep = data.load_pairs(write(tmp_path, "a.jsonl", [dict(GOOD, rejected=""), dict(GOOD, chosen=" ")]))
  assert len(pairs) == 2 and rep.one_empty == 2


# --- accepted layout quirks ---------------------------------------------------------------------------------


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
  line = json.dumps(GOOD).encode()
  other = json.dumps(dict(GOOD, chosen="other")).encode()
  # BOM on line 1 and again mid-file (concatenated files), CRLF endings, blank and whitespace lines.
  content = b"\xef\xbb\xbf" + line + b"\r\n\r\n   \n\xef\xbb\xbf" + other + b"\r\n"
  pairs, rep = data.load_pairs(write(tmp_path, "a.jsonl", content))
  assert [p.chosen for p in pairs] == ["yes", "other"] and rep.lines == 2
  assert pairs[1].where.endswith(":4")  # Line numbers count blank lines.


def test_json_array_numbers_elements_by_line(tmp_path):
  text = "\ufeff[\n" + json.dumps(GOOD) + ",\n\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n]\n"
  path = write(tmp_path, "a.json", text)
  with pytest.raises(ConfigError, match=r"a\.json:4: missing key 'rejected'"):
    data.load_pairs(path)
  pairs, rep = data.load_pairs(path, on_bad_line="skip")
  assert len(pairs) == 1 and pairs[0].where == f"{path}:2" and rep.skipped == 1


def test_json_array_syntax_error_names_its_line(tmp_path):
  path = write(tmp_path, "a.json", "[\n" + json.dumps(GOOD) + ",\n{\"prompt\": oops}\n]")
  with pytest.raises(ConfigError, match=r"a\.json:3: invalid JSON"):
    data.load_pairs(path, on_bad_line="skip")


def test_json_that_is_really_jsonl_and_gzip(tmp_path):
  rows = [GOOD, dict(GOOD, chosen="2")]
  assert len(data.load_pairs(write(tmp_path, "a.json", rows))[0]) == 2
  raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
  assert len(data.load_pairs(write(tmp_path, "a.jsonl.gz", gzip.compress(raw)))[0]) == 2
  array = gzip.compress(json.dumps(rows).encode())
  assert len(data.load_pairs(write(tmp_path, "a.json.gz", array))[0]) == 2


# --- bad lines ----------------------------------------------------------------------------------------------

ASSISTANT = {"role": "assistant", "content": "a"}
BAD_LINES = [
    ("invalid-json", b'{"prompt": "Q", "chosen": "a",', "invalid JSON"),
    ("not-an-object", b'["Q", "a", "b"]', "expected a JSON object, got array"),
    ("missing-key", b'{"prompt": "Q", "chosen": "a"}', "missing key 'rejected'"),
    ("wrong-type", b'{"prompt": "Q", "chosen": 3, "rejected": "b"}', "'chosen' must be a string, got number"),
    ("null", b'{"prompt": null, "chosen": "a", "rejected": "b"}', "'prompt' must be a string, got null"),
    ("both-empty", b'{"prompt": "Q", "chosen": "", "rejected": " \\t"}', "both empty"),
    ("whitespace-message", json.dumps({"prompt": [{"role": "user", "content": "  "}], "chosen": [ASSISTANT],
                                       "rejected": "b"}).encode(), "prompt[0].content' is empty"),
    ("identical", b'{"prompt": "Q", "chosen": "same", "rejected": "same"}', "identical"),
    ("unknown-role", json.dumps({"prompt": [{"role": "human", "content": "hi"}], "chosen": [ASSISTANT],
                                 "rejected": "b"}).encode(), "unknown role 'human'"),
    ("user-response", json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [ASSISTANT],
                                  "rejected": [{"role": "user", "content": "b"}]}).encode(), "must be assistant"),
    ("not-utf8", b'{"prompt": "Q", "chosen": "caf\xe9", "rejected": "b"}', "not UTF-8"),
    ("surrogate", b'{"prompt": "Q", "chosen": "\\ud800", "rejected": "b"}', "unpaired surrogate"),
    ("nan-margin", b'{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": NaN}', "finite number"),
    ("string-margin", b'{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "1"}', "finite number"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("huge-integer", b'{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": ' + b"9" * 5000 + b"}",
     "invalid JSON"),
    ("bare-cr", json.dumps(GOOD).encode() + b"\r" + json.dumps(GOOD).encode(), "bare CR"),
    ("no-shared-turn", b'{"chosen": "\\n\\nHuman: a", "rejected": "\\n\\nHuman: b"}', "share no"),
    ("ranked-one-response", b'{"prompt": "Q", "responses": ["a"], "scores": [1]}', "at least 2 responses"),
    ("ranked-no-scores", b'{"prompt": "Q", "responses": ["a", "b"]}', "exactly one of 'scores'"),
    ("ranked-short-scores", b'{"prompt": "Q", "responses": ["a", "b"], "scores": [1]}', "array of 2 numbers"),
    ("ranked-nan-score", b'{"prompt": "Q", "responses": ["a", "b"], "scores": [1, NaN]}', "scores[1] must be a"),
    ("ranked-rank-zero", b'{"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 0]}', "ranking[1] must be a rank"),
    ("ranked-repeat", b'{"prompt": "Q", "responses": ["a", "a"], "scores": [1, 0]}', "responses[1] repeats"),
    ("ranked-all-tied", b'{"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 1]}', "no comparison"),
    ("ranked-two-empty", b'{"prompt": "Q", "responses": ["", " ", "c"], "scores": [1, 2, 3]}', "both empty"),
    ("ranked-bad-response", b'{"prompt": "Q", "responses": ["a", 3], "scores": [1, 0]}', "'responses[1]' must be"),
]


@pytest.mark.parametrize("name,line,problem", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_is_one_line_error_or_counted_skip(tmp_path, name, line, problem):
  good = json.dumps(GOOD).encode()
  path = write(tmp_path, f"{name}.jsonl", good + b"\n" + line + b"\n" + good.replace(b"yes", b"ok") + b"\n")
  with pytest.raises(ConfigError) as e:
    data.load_pairs(path)
  message = str(e.value)
  assert f"{path}:2: " in message and problem in message and "\n" not in message
  pairs, rep = data.load_pairs(path, on_bad_line="skip")
  assert [p.chosen for p in pairs] == ["yes", "ok"]
  assert rep.skipped == 1 and rep.skip_reasons[0].startswith(f"{path}:2: ")


def test_absurdly_long_line_is_skipped_in_bounded_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(jsonfile, "MAX_LINE_BYTES", 1000)
  long = json.dumps(dict(GOOD, chosen="x" * 5000)).encode()
  path = write(tmp_path, "long.jsonl", long + b"\n" + json.dumps(GOOD).encode() + b"\n")
  with pytest.raises(ConfigError, match=r"long\.jsonl:1: line is 5,0\d\d bytes; longer than"):
    data.load_pairs(path)
  pairs, rep = data.load_pairs(path, on_bad_line="skip")
  # The reader resynchronises on the next line: line 2 still loads with its own number.
  assert rep.skipped == 1 and [p.where for p in pairs] == [f"{path}:2"]


def test_skip_reasons_are_capped(tmp_path):
  path = write(tmp_path, "a.jsonl", b"{}\n" * 9 + json.dumps(GOOD).encode())
  pairs, rep = data.load_pairs(path, on_bad_line="skip")
  assert len(pairs) == 1 and rep.skipped == 9 and len(rep.skip_reasons) == data.SHOWN_SKIP_REASONS


# --- bad files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,problem", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "the file is empty"),
    ("blank", "the file is empty"),
    ("nothing-usable", "no usable pair among 2 lines"),
    ("bad-gzip", "cannot read"),
    ("json-object", "must hold an array"),
    ("utf-16", "UTF-16 encoded; save it as UTF-8"),
])
def test_bad_file_is_one_line_error(tmp_path, case, problem):
  path = str(tmp_path / "x.jsonl")
  if case == "directory":
    os.mkdir(path)
  elif case == "empty":
    write(tmp_path, "x.jsonl", b"")
  elif case == "blank":
    write(tmp_path, "x.jsonl", b"\n \r\n\n")
  elif case == "nothing-usable":
    write(tmp_path, "x.jsonl", b"{}\nnot json\n")
  elif case == "bad-gzip":
    path = write(tmp_path, "x.jsonl.gz", b"this is not gzip\n")
  elif case == "utf-16":
    write(tmp_path, "x.jsonl", json.dumps(GOOD).encode("utf-16"))
  elif case == "json-object":
    path = write(tmp_path, "x.json", json.dumps({"data": [GOOD]}))
  with pytest.raises(ConfigError, match=problem) as e:
    data.load_pairs(path, on_bad_line="skip")
  assert path in str(e.value) and "\n" not in str(e.value)


# --- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "bad-line"])
def test_main_reports_bad_input_in_one_line_with_exit_2(tmp_path, case):
  if case == "missing":
    path, expected = str(tmp_path / "nope.jsonl"), "does not exist"
  else:
    path = write(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n{\"prompt\": \"Q\", \"chosen\": \"a\"}\n")
    expected = f"{path}:2: missing key 'rejected'"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxreward.main", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
       f"--config.data.train_path={path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags()))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
