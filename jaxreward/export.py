"""What an HF export carries besides its weights: a tokenizer that encodes as training did, and its model card.

RL stacks (TRL, OpenRLHF, verl) score with the plain transformers calls, so the exported tokenizer must
produce training's token ids by itself, with no extra arguments:

  tokenizer(prompt + response, truncation=True) == tokenizer.encode(...) ids
    = leading specials (e.g. BOS) + tokens of the text + EOS, the text cut from the left to data.max_length

That takes a post-processor that appends EOS (saved in tokenizer.json, so it survives from_pretrained),
`truncation_side="left"` and `model_max_length` = the trained max_length in tokenizer_config.json, and a chat
template whose rendering, tokenized, gives training's ids: our own BPE gets tokenizer.PLAIN_CHAT_TEMPLATE; a
template that writes BOS itself (the tokenizer adds it now) or ends with EOS (the post-processor adds it) is
wrapped so it does not. Padding is on the right with a pad token other than EOS (hf.export refuses pad ==
EOS), so `*ForSequenceClassification`, which reads the last token that is not pad, reads the reward at our
EOS. A post-processor cannot look at the text, so a plain text that already ends in EOS gets a second one
from transformers (jaxreward's own encoding keeps one): the scoring contract is to pass text without EOS.
`save_tokenizer` re-reads what it wrote and checks it against `tokenizer.encode`.
"""

from __future__ import annotations

import json

import transformers
from tokenizers import processors

from jaxreward import data, storage, tokenizer as tokenizer_lib
from jaxreward.configuration import ConfigError

PROBE_CHAT = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes, mostly."}]
CONTRACT = ("The reward of a text is this model's score at the EOS token that the tokenizer appends: pass the "
            "prompt and response joined with nothing between (or a conversation rendered with "
            "`apply_chat_template(..., tokenize=False)`), without an EOS of your own, with `truncation=True`; "
            "the tokenizer then adds {leading}EOS (`{eos}`) and keeps the last {max_length} tokens, as training did.")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _chat_template(tok, leading: list[int]) -> str | None:
  """The template to export: ours for a tokenizer without one; else the tokenizer's, rewritten so that its
  rendering carries neither the BOS nor the final EOS that the exported tokenizer adds itself."""
  template = getattr(tok, "chat_template", None)
  if not template:
    return tokenizer_lib.PLAIN_CHAT_TEMPLATE
  if not isinstance(template, str):
    return template  # Several named templates: kept as they are (their chat rows are not checked).
  try:
    probe = tok.apply_chat_template(PROBE_CHAT, tokenize=False)
  except Exception:  # pylint: disable=broad-except  (a template that rejects the probe's roles: kept as is)
    return template
  if leading and tok.bos_token and probe.startswith(tok.bos_token):
    # A top-level `set` shadows the bos_token the template is rendered with.
    template = "{% set bos_token = '' %}" + template
  if tok.eos_token and probe.endswith(tok.eos_token):
    template = ("{% set rendered %}" + template + "{% endset %}"
                "{{ rendered[:rendered|length - eos_token|length] if rendered.endswith(eos_token) else rendered }}")
  return template


def save_tokenizer(tok, out_dir: str, max_length: int):
  """Writes `tok` to `out_dir` as a tokenizer that encodes like `tokenizer.encode(..., max_length)`; returns it
  re-read from disk. ConfigError if the re-read tokenizer does not encode the probes as training does."""
  tok.save_pretrained(out_dir)
  # A fresh copy to edit: the caller's tokenizer (a Scorer's, a test's) stays as it was.
  out = transformers.AutoTokenizer.from_pretrained(out_dir)
  leading = tokenizer_lib.leading_special_ids(tok)
  names = out.convert_ids_to_tokens(leading) + [out.eos_token]
  if any(":" in n or " " in n for n in names):
    raise ConfigError(f"hf: cannot write a post-processor for special tokens {names} (':' or ' ' in a name)")
  specials = sorted(set(zip(names, leading + [out.eos_token_id])))
  out.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single=names[:-1] + ["$A", names[-1]], pair=names[:-1] + ["$A", "$B:1", names[-1] + ":1"],
      special_tokens=specials)
  # transformers 5 rebuilds the post-processor from add_bos_token/add_eos_token when the config names them.
  for key in ("add_bos_token", "add_eos_token"):
    out.init_kwargs.pop(key, None)
  settings = {"model_max_length": max_length, "truncation_side": "left", "padding_side": "right",
              "model_input_names": ["input_ids", "attention_mask"]}
  for key, value in settings.items():
    setattr(out, key, value)
    out.init_kwargs[key] = value
  out.chat_template = _chat_template(tok, leading)
  out.save_pretrained(out_dir)
  exported = transformers.AutoTokenizer.from_pretrained(out_dir)
  check(exported, tok, max_length)
  return exported


def check(exported, trained, max_length: int) -> None:
  """The exported tokenizer's plain encoding of probe rows (short, longer than max_length, a conversation)
  equals training's `tokenizer.encode`; a ConfigError names the first row that differs."""
  rows = [("Is the sky blue?", " Yes, mostly."), ("", "Yes."),
          ("Count: " + " ".join(str(i) for i in range(4 * max_length)), " Done.")]
  can_chat = isinstance(exported.chat_template, str)
  if can_chat:
    try:
      tokenizer_lib.render(PROBE_CHAT[:1], PROBE_CHAT[1:], trained)
    except ConfigError:
      can_chat = False  # The trained tokenizer's own template rejects the probe: nothing to compare against.
  if can_chat:
    rows.append((PROBE_CHAT[:1], PROBE_CHAT[1:]))
  want = tokenizer_lib.encode([data.Pair(p, r, r) for p, r in rows], trained, max_length, "keep_end").ids
  for (prompt, response), (ids, _) in zip(rows, want):
    text = (prompt + response if isinstance(prompt, str)
            else exported.apply_chat_template(prompt + response, tokenize=False))
    got = exported(text, truncation=True)["input_ids"]
    if list(got) != ids.tolist():
      # e.g. transformers 5 rebuilds every qwen2 folder's tokenizer with Qwen2's own pre-tokenizer.
      raise ConfigError(f"hf: transformers loads the exported tokenizer as {type(exported).__name__}, which encodes "
                        f"{text[:30]!r}... as {list(got)[:5]}...{list(got)[-2:]} ({len(got)} ids) but training "
                        f"as {ids.tolist()[:5]}...{ids.tolist()[-2:]} ({len(ids)}); the export would score wrongly "
                        "(export another family with --model_type, or train with that family's tokenizer)")


# ---------------------------------------------------------------------------------------------------------------
# Run facts and the model card
# ---------------------------------------------------------------------------------------------------------------


def summary(workdir: str) -> dict:
  """The run's metrics.json (best checkpoint, data counts, gate), or {}."""
  path = storage.join(workdir, "metrics.json")
  return json.loads(storage.read_text(path)) if storage.isfile(path) else {}


def eval_row(workdir: str, step: int) -> dict:
  """The evaluation row of checkpoint `step` (metrics.jsonl), else the best checkpoint's summary (metrics.json)."""
  path = storage.join(workdir, "metrics.jsonl")
  if storage.isfile(path):
    for line in storage.read_text(path).splitlines():
      row = json.loads(line) if line.strip() else {}
      if row.get("kind") == "eval" and row.get("step") == step:
        return row
  return summary(workdir)


def model_card(*, family: str, max_length: int, leading: list[str], eos: str, stats: dict | None,
               evaluation: dict, summary: dict, step: int | None, source: str | None) -> str:
  """The export's README.md: how to score with transformers, what the number means, and how good it is."""
  contract = CONTRACT.format(leading="".join(f"`{t}` before and " for t in leading), eos=eos,
                             max_length=max_length)
  lines = ["---", "library_name: transformers", "pipeline_tag: text-classification", "tags:", "- reward-model",
           "- jaxreward", "---", "", f"# Reward model ({family}ForSequenceClassification, exported by jaxreward)", "",
           "A Bradley-Terry reward model: one scalar per text, **higher = preferred**; the probability that a "
           "human prefers response a over b is modelled as σ(r_a − r_b). Only differences between rewards for the "
           "same prompt are meaningful.", "",
           f"**Scoring contract.** {contract}", "",
           "## Score with transformers", "",
           "```python",
           "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
           'tok = AutoTokenizer.from_pretrained("PATH")',
           'model = AutoModelForSequenceClassification.from_pretrained("PATH")',
           'batch = tok([prompt + response for prompt, response in rows], padding=True, truncation=True, '
           'return_tensors="pt")',
           "rewards = model(**batch).logits[:, 0]",
           "```", "",
           "Conversations (a list of `{role, content}` messages ending with the assistant reply to score):", "",
           "```python",
           "text = tok.apply_chat_template(messages, tokenize=False)",
           'reward = model(**tok(text, truncation=True, return_tensors="pt")).logits[0, 0]',
           "```", "",
           '`pipeline("text-classification", model="PATH", function_to_apply="none")` gives the same rewards '
           "(`truncation=True` for long texts). jaxreward scores the folder identically: "
           '`jaxreward.load_scorer("PATH")(prompts, responses)` or `python -m jaxreward.score --model PATH`.', ""]
  lines += ["## Normalisation", ""]
  if stats:
    lines += [f"Validation rewards had mean {stats['mean']:.6g} and std {stats['std']:.6g} "
              f"({stats.get('source', 'reward_normalization.json')}). RL trainers usually feed "
              "`(r - mean) / std`; the numbers are in `reward_normalization.json`.", ""]
  else:
    lines += ["No validation reward statistics were saved with this model.", ""]
  if evaluation or summary:
    lines += ["## Accuracy", "", "| metric | value |", "|---|---|"]
    if step is not None:
      lines.append(f"| checkpoint step | {step} |")
    for key, name in (("val_accuracy", "validation pairwise accuracy"), ("train_accuracy", "train accuracy "
                      "(fixed sample)"), ("val_loss", "validation Bradley-Terry loss")):
      if key in evaluation:
        lines.append(f"| {name} | {evaluation[key]:.4f} |")
    for key, name in (("val_pairs", "validation pairs"), ("train_pairs", "training pairs")):
      if key in summary:
        lines.append(f"| {name} | {summary[key]} |")
    if "random_baseline_accuracy" in summary:
      lines.append(f"| random baseline | {summary['random_baseline_accuracy']:.2f} |")
    if "gate_pass" in summary:
      lines.append(f"| jaxreward quality gate (best checkpoint) | {'pass' if summary['gate_pass'] else 'FAIL'} |")
    lines.append("")
  if source:
    lines += [f"Trained with jaxreward in `{source}`; its README.md is the training report (data, curves, "
              "error analysis).", ""]
  return "\n".join(lines)
