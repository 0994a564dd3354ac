"""A pytest plugin that prints each failure's traceback the moment the test fails.

tools/gpu_check.sh caps every stage with `timeout -s KILL`; pytest's own failure report comes only at the end of
the session, so a capped stage would lose it. Loaded with `-p pytest_print_failures` (tools/ on PYTHONPATH).
"""


def pytest_runtest_logreport(report):
  if report.failed:
    print(f"\n----- failure of {report.nodeid} ({report.when}) -----\n{report.longreprtext[-4000:]}\n-----", flush=True)
