"""python -m jaxreward.commands.serve --model RUN_OR_HF_DIR [--port 5000] [--host 127.0.0.1] [--normalize_reward]

Serves a trained reward model over HTTP for RL jobs (jaxreward/serve.py says what the endpoints and the
batching do). Every scoring shape is compiled before the server listens; SIGTERM drains and exits 0.
Exit codes: 0 served and drained, 2 bad input (one line on stderr), 1 the server could not start.
"""

from __future__ import annotations

from jaxreward import allocator

if __name__ == "__main__":
  allocator.reexec()  # Before JAX and the rest are imported: the second start then costs only Python's.

import signal
import sys

from absl import flags

from jaxreward import checkpoint, commands, configuration, protocol, score, serve
from jaxreward.configuration import ConfigError

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "a jaxreward work dir or an exported HF folder", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "best", "work dir only: best | latest | STEP", flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "override the scoring max length", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on", flag_values=FLAGS)
flags.DEFINE_integer("port", 5000, "port to listen on (0: any free port)", flag_values=FLAGS)
flags.DEFINE_bool("normalize_reward", False,
                  "/get_reward returns rewards normalised with the saved validation mean/std", flag_values=FLAGS)
flags.DEFINE_integer("max_body_bytes", protocol.Limits.max_body_bytes, "bytes per request body",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_rows", protocol.Limits.max_rows, "rows per request", flag_values=FLAGS)
flags.DEFINE_integer("max_chars", protocol.Limits.max_chars, "characters per row", flag_values=FLAGS)
flags.DEFINE_float("batch_wait_ms", 2.0, "how long the worker waits for more requests to join a batch",
                   flag_values=FLAGS)
flags.DEFINE_integer("batch_rows", 64, "rows after which a batch stops gathering", flag_values=FLAGS)
flags.DEFINE_float("drain_timeout", 60.0, "seconds SIGTERM waits for requests in flight", flag_values=FLAGS)
flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"], "uvicorn's log level",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["model"], flag_values=FLAGS)


def check_flags() -> None:
  for key in ("max_body_bytes", "max_rows", "max_chars", "batch_rows"):
    if FLAGS[key].value < 1:
      raise ConfigError(f"--{key} must be >= 1, got {FLAGS[key].value}")
  if FLAGS.batch_wait_ms < 0 or FLAGS.drain_timeout < 0:
    raise ConfigError("--batch_wait_ms and --drain_timeout must be >= 0")
  if not 0 <= FLAGS.port <= 65535:
    raise ConfigError(f"--port must be in 0..65535, got {FLAGS.port}")


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, __doc__)
  if isinstance(rest, int):
    return rest
  try:
    check_flags()
    which = checkpoint.parse_which(FLAGS.checkpoint)
    compiles = serve.CompileCounter()
    scorer = score.load_scorer(FLAGS.model, which, FLAGS.max_length)
    if FLAGS.normalize_reward and (scorer.mean is None or scorer.std is None):
      raise ConfigError(f"{FLAGS.model}: --normalize_reward needs the validation reward mean/std saved at "
                        "training (metrics.jsonl / reward_normalization.json); none found")
  except ConfigError as e:
    return commands.fail(e)
  shapes = scorer.warmup()
  limits = protocol.Limits(FLAGS.max_body_bytes, FLAGS.max_rows, FLAGS.max_chars)
  service = serve.Service(scorer, limits, FLAGS.normalize_reward, FLAGS.batch_rows, FLAGS.batch_wait_ms / 1000,
                          compiles)
  server = serve.make_server(service, FLAGS.host, FLAGS.port, FLAGS.drain_timeout, FLAGS.log_level)
  print(f"serving {scorer.description} on http://{FLAGS.host}:{FLAGS.port} ({shapes} shapes compiled; "
        "POST /get_reward, POST /score, GET /health)", file=sys.stderr, flush=True)
  # uvicorn drains on SIGTERM / SIGINT, then raises the signal again under the handler it found: make that a
  # no-op, so a drained server exits 0 rather than dying of the re-raised signal.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  server.run()
  return configuration.EXIT_OK if server.started else configuration.EXIT_CRASH


def run() -> None:
  allocator.reexec()  # The installed script (pyproject [project.scripts]) enters here; a no-op under -m.
  sys.exit(main())


if __name__ == "__main__":
  run()
