"""corpus.prepare end to end on small files: hygiene, truncation, HF tokenizer folders, TFDS, exact resume."""

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest

from conftest import ROOT
from jaxreward import corpus, data, pipeline, tfds_data, tokenizer as tokenizer_lib
from jaxreward.configuration import ConfigError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def rows(n, prompts=None):
  prompts = prompts or n
  return [{"prompt": f"question {i % prompts}: what is {i} plus {i}?", "chosen": f"it is {2 * i}",
           "rejected": f"it is {2 * i + 1}, surely", "category": f"c{i % 3}"} for i in range(n)]


def write_jsonl(path, items):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
  return str(path)


def prepare(config):
  messages = []
  prepared = corpus.prepare(config, messages.append)
  return prepared, messages


def hf_tokenizer(folder, chat_template=None, pad=True, pad_is_eos=False):
  """A BPE tokenizer saved as an HF folder, like one a user brings (no hub needed)."""
  import transformers  # pylint: disable=g-import-not-at-top
  texts = [json.dumps(r) for r in rows(200)] + ["<|im_start|>user\nhello<|im_end|>\n"]
  base = tokenizer_lib.train_bpe(texts, 400)._tokenizer
  kwargs = {"eos_token": "<|endoftext|>"}
  if pad:
    kwargs["pad_token"] = "<|endoftext|>" if pad_is_eos else "<|pad|>"
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=base, **kwargs)
  if chat_template:
    tok.chat_template = chat_template
  tok.save_pretrained(folder)
  return str(folder)


# --- hygiene and truncation ---------------------------------------------------------------------------------


def test_duplicates_and_leaks_against_explicit_validation_file(tiny_config, tmp_path):
  train_rows = rows(80)
  train_rows += train_rows[:5]  # Exact duplicates.
  val_rows = rows(100)[80:] + [dict(train_rows[0], chosen="another answer")]  # Prompt 0 leaks.
  tiny_config.data.train_path = write_jsonl(tmp_path / "t.jsonl", train_rows)
  tiny_config.data.validation_path = write_jsonl(tmp_path / "v.jsonl", val_rows)
  prepared, messages = prepare(tiny_config)
  s = prepared.stats
  assert (s["duplicates_removed"], s["leaks_removed"]) == (5, 1)
  assert (len(prepared.train), len(prepared.validation)) == (79, 21)
  train_prompts = {p.prompt for p in prepared.train.pairs}
  assert not train_prompts & {p.prompt for p in prepared.validation.pairs}
  assert prepared.train.pairs[0].extra == {"category": "c1"}  # Extra fields survive for error analysis.
  assert any("removed 5 duplicate pairs and 1" in m for m in messages)


def test_bad_lines_skipped_are_counted_in_stats(tiny_config, tmp_path):
  lines = [json.dumps(r) for r in rows(60)]
  lines[3], lines[7] = "{broken", json.dumps({"prompt": "p", "chosen": "a"})
  path = tmp_path / "t.jsonl"
  path.write_text("\n".join(lines))
  tiny_config.data.train_path, tiny_config.data.on_bad_line = str(path), "skip"
  prepared, messages = prepare(tiny_config)
  assert prepared.stats["bad_lines_skipped"] == 2 and len(prepared.train) + len(prepared.validation) == 58
  assert prepared.stats["skip_reasons"][0].startswith(f"{path}:4: invalid JSON")
  assert any("skipped 2 bad lines" in m for m in messages)


@pytest.mark.parametrize("truncation", ["keep_end", "drop"])
def test_truncation_counts(tiny_config, tmp_path, truncation):
  items = rows(60)
  for r in items[:20]:
    r["prompt"] = "a long preamble that repeats " * 30 + r["prompt"]
  tiny_config.data.train_path = write_jsonl(tmp_path / "t.jsonl", items)
  tiny_config.data.truncation = truncation
  prepared, _ = prepare(tiny_config)
  s, n = prepared.stats, len(prepared.train) + len(prepared.validation)
  if truncation == "keep_end":
    assert s["truncated_pairs"] == 20 and s["dropped_pairs"] == 0 and n == 60
    eos = prepared.tokenizer.eos_token_id
    for ids in prepared.train.ids:
      for side in ids:  # Cut from the prompt's start: length max_length, the response and EOS kept.
        assert len(side) <= tiny_config.data.max_length and side[-1] == eos
  else:
    assert s["truncated_pairs"] == 0 and s["dropped_pairs"] == 20 and n == 40


# --- tokenizers ---------------------------------------------------------------------------------------------


def test_hf_tokenizer_folder_with_chat_template(tiny_config, tmp_path):
  user = {"role": "user", "content": "hello"}
  conv = [{"prompt": [user, {"role": "assistant", "content": "hi"}, {"role": "user", "content": f"n {i}?"}],
           "chosen": [{"role": "assistant", "content": f"yes {i}"}], "rejected": f"no {i}"} for i in range(40)]
  tiny_config.data.train_path = write_jsonl(tmp_path / "c.jsonl", conv + rows(40))
  tiny_config.data.tokenizer = hf_tokenizer(tmp_path / "tok", CHATML)
  tiny_config.data.max_length = 256  # A 400-token BPE spells the ChatML markers out: keep the whole text.
  prepared, _ = prepare(tiny_config)
  assert prepared.stats["truncated_pairs"] == 0
  tok = prepared.tokenizer
  assert tok.pad_token_id != tok.eos_token_id
  enc = prepared.train
  for pair, ids in zip(enc.pairs, enc.ids):
    for side, response in zip(ids, (pair.chosen, pair.rejected)):
      assert side[-1] == tok.eos_token_id and (side[:-1] != tok.eos_token_id).all()  # EOS once, last.
      text = tok.decode(side[:-1])
      if isinstance(pair.prompt, list):  # Rendered by the folder's chat template, not the plain one.
        assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith(
            f"<|im_start|>assistant\n{response[0]['content']}<|im_end|>\n")
      else:
        assert text == pair.prompt + response


@pytest.mark.parametrize("pad,pad_is_eos", [(False, False), (True, True)])
def test_hf_tokenizer_without_pad_or_with_pad_equal_to_eos_gets_a_distinct_pad(tmp_path, pad, pad_is_eos):
  tok = tokenizer_lib.load(hf_tokenizer(tmp_path / "tok", pad=pad, pad_is_eos=pad_is_eos))
  assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_tokenizer_folder_that_is_not_one_is_a_config_error(tiny_config, tmp_path):
  (tmp_path / "tok").mkdir()
  tiny_config.data.train_path = write_jsonl(tmp_path / "t.jsonl", rows(40))
  tiny_config.data.tokenizer = str(tmp_path / "tok")
  with pytest.raises(ConfigError, match="has no tokenizer files"):
    prepare(tiny_config)


# --- TFDS ---------------------------------------------------------------------------------------------------


def load_tool():
  spec = importlib.util.spec_from_file_location("jsonl_to_tfds", ROOT / "tools" / "jsonl_to_tfds.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def strip_where(pairs):
  return [dataclasses.replace(p, where="") for p in pairs]


def test_jsonl_to_tfds_round_trip_all_formats(tmp_path, capsys):
  head = "\n\nHuman: hi\n\nAssistant:"
  user = {"role": "user", "content": "hi"}
  items = rows(30) + [
      {"chosen": head + " fine", "rejected": head + " bad", "margin": 1.5},
      {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b", "source": "x"},
      {"prompt": "", "chosen": "ok", "rejected": ""},
  ]
  train = write_jsonl(tmp_path / "t.jsonl", items)
  val = write_jsonl(tmp_path / "v.jsonl", rows(40)[30:])
  assert load_tool().main([train, str(tmp_path / "tfds"), "--name", "prefs", "--validation", val]) == 0
  assert capsys.readouterr().out.strip().endswith("prefs/1.0.0")
  splits = tfds_data.read("prefs", str(tmp_path / "tfds"))
  for split, path in (("train", train), ("validation", val)):
    pairs, report = splits[split]
    expected, _ = data.load_pairs(path)
    assert strip_where(pairs) == strip_where(expected)  # File order too, although array_record hashes keys.
    assert [p.where for p in pairs] == [p.where for p in expected]
  # The implicit transcript is stored already split: it reads back as an explicit pair.
  assert splits["train"][1].formats == {"explicit": 32, "conversational": 1}


def test_jsonl_to_tfds_bad_input_exits_2(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows(1)[0]) + "\n{\"prompt\": 1}\n")
  assert load_tool().main([str(bad), str(tmp_path / "tfds"), "--name", "prefs"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{bad}:2: missing key 'chosen'" in err[0]
  assert load_tool().main([str(bad), str(tmp_path / "tfds"), "--name", "Bad-Name", "--on_bad_line", "skip"]) == 2
  assert "snake_case" in capsys.readouterr().err


def test_tfds_source_errors_name_what_exists(tiny_config, tmp_path):
  tiny_config.data.source = "tfds"
  tiny_config.data.tfds_data_dir = str(tmp_path)
  tiny_config.data.tfds_name = "nope"
  (tmp_path / "other").mkdir()
  with pytest.raises(ConfigError, match=r"no dataset 'nope' in .* \(found: other\)"):
    prepare(tiny_config)
  tiny_config.data.tfds_name = "other"
  with pytest.raises(ConfigError, match="holds no prepared version"):
    prepare(tiny_config)


def test_tiny_training_from_tfds(tiny_config, tmp_path):
  from jaxreward import train  # pylint: disable=g-import-not-at-top
  train_path = write_jsonl(tmp_path / "t.jsonl", rows(120, prompts=60))
  tfds_data.write("arith", str(tmp_path / "tfds"), {"train": data.load_pairs(train_path)[0]})
  tiny_config.data.source = "tfds"
  tiny_config.data.tfds_name = "arith:1.0.0"
  tiny_config.data.tfds_data_dir = str(tmp_path / "tfds")
  tiny_config.train.num_steps = 2
  summary = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  # No validation split in the dataset: the 80/20 split by prompt applies, as for a single JSONL file.
  assert summary["training_steps"] == 2 and summary["val_pairs"] == 24 and summary["train_pairs"] == 96
  assert np.isfinite(summary["val_loss"])


# --- exact resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_grain_iterator_state_round_trips_to_the_same_next_batch(tiny_config, tmp_path, packed):
  tiny_config.data.train_path = write_jsonl(tmp_path / "t.jsonl", rows(100))
  prepared, _ = prepare(tiny_config)
  plan = pipeline.TrainPlan(prepared.train, batch_size=16, sort_window=2, seed=3)
  pad = prepared.tokenizer.pad_token_id
  if packed:
    layout = pipeline.PackedLayout(tiny_config.data.max_length, 2, 16, pad)
    layout.fit_buckets([layout.rows_needed(plan.enc, idx) for idx in plan.epoch(0)], 2)
  else:
    layout = pipeline.BucketedLayout(
        pipeline.bucket_lengths(tiny_config.data.max_length, tiny_config.data.num_buckets), pad)
  make = lambda: iter(pipeline.train_dataset(plan, 20, layout))
  original = make()
  for _ in range(7):  # 5 batches per epoch: the saved state lies in the second epoch.
    next(original)
  state = original.get_state()
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))  # Checkpoints store it as JSON.
  for _ in range(4):  # Across the next epoch boundary too.
    expected, got = next(original), next(resumed)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
  fresh = make()
  assert not np.array_equal(next(fresh).tokens_GxRxL, next(make_after(make, 11)).tokens_GxRxL)


def make_after(make, n):
  it = make()
  for _ in range(n):
    next(it)
  return it


# --- hygiene ------------------------------------------------------------------------------------------------


def test_duplicates_and_leaks_are_removed_and_counted():
  mk = lambda p, c: data.Pair(p, c, "r")
  pairs = [mk("a", "1"), mk("a", "1"), mk("b", "1"), mk("c", "1"), mk("a", "2")]
  kept, dups = corpus.deduplicate(pairs)
  assert dups == 1 and [p.chosen for p in kept] == ["1", "1", "1", "2"]
  train, leaks = corpus.remove_leaks(kept, [mk("a", "9")])
  assert leaks == 2 and [p.prompt for p in train] == ["b", "c"]


def test_split_keeps_each_prompt_on_one_side():
  pairs = [data.Pair(f"p{i % 50}", f"c{i}", "r") for i in range(500)]
  train, val = corpus.split(pairs, 0.2, seed=0)
  assert len(train) + len(val) == 500 and 0.15 < len(val) / 500 < 0.25
  assert not {p.prompt for p in train} & {p.prompt for p in val}
  assert corpus.split(pairs, 0.2, seed=0) == (train, val)
