"""One process of tests/test_corpus_hosts.py: reads and tokenizes the corpus (corpus.prepare), nothing else.

  python tests/tokenize_worker.py WORKDIR PROCESS_ID PORT PROCESSES [CONFIG [TRAIN_PATH]]   # one CPU device each
  python tests/tokenize_worker.py WORKDIR single - 1 [CONFIG [TRAIN_PATH]]                   # one process

Prints one JSON line: this process's index, how many pairs it passed to tokenizer.encode, the seconds spent in
corpus.encode_across_hosts, and a digest of the train and validation Encoded (equal digests: equal Encoded).
"""

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from tests.conftest import load_config  # pylint: disable=g-import-not-at-top


def digest(enc) -> str:
  """Everything an Encoded holds: ids, pairs, margins, prompt groups, counts."""
  h = hashlib.sha256()
  for sides, pair in zip(enc.ids, enc.pairs, strict=True):
    for side in sides:
      h.update(np.asarray(side, np.int32).tobytes() + b"|")
    h.update(repr(pair.key()).encode())
  h.update(np.asarray(enc.margin, np.float32).tobytes() + np.asarray(enc.prompt_group, np.int64).tobytes())
  h.update(f"{len(enc)} {enc.truncated} {enc.dropped}".encode())
  return h.hexdigest()


def make_config(config_name="tiny", train_path=""):
  config = load_config(config_name)
  config.data.train_path = train_path
  config.data.min_pairs = 0
  return config


def main(workdir, mode, port="-", processes="1", config_name="tiny", train_path=""):
  config = make_config(config_name, train_path)
  if mode != "single":
    jax.config.update("jax_num_cpu_devices", 1)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(processes),
                               process_id=int(mode))
  from jaxreward import corpus, tokenizer  # pylint: disable=g-import-not-at-top
  counted, seconds = [], []
  encode, across = tokenizer.encode, corpus.encode_across_hosts
  tokenizer.encode = lambda pairs, *args: counted.append(len(pairs)) or encode(pairs, *args)

  def timed(*args):
    start = time.perf_counter()
    out = across(*args)
    seconds.append(time.perf_counter() - start)
    return out

  corpus.encode_across_hosts = timed
  prepared = corpus.prepare(config, lambda message: None, workdir)
  print(json.dumps({"process_index": jax.process_index(), "pairs_tokenized": sum(counted),
                    "encode_s": sum(seconds), "train": digest(prepared.train),
                    "validation": digest(prepared.validation),
                    "pairs": len(prepared.train) + len(prepared.validation)}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
