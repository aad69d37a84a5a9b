r"""Runs a gin-configured experiment sweep and writes its results folder.

  python experiments/run.py                                  # quickstart.gin (CPU, seconds)
  python experiments/run.py --gin_file=throughput_curves.gin --gin.experiment.name=tc_8b
  python experiments/run.py --gin_file=a.gin --gin_file=b.gin --gin_bindings='grid.batch=[8]'

--gin_file is repeatable (later files override earlier ones) and is looked up in
experiments/configs/ when not a path; --gin_bindings is repeatable; `--gin.X=Y` is shorthand for
`--gin_bindings=X=Y`. The folder written is printed last (see experiments/harness.py); its
columns.md defines every column of rows.csv (harness.COLUMNS).

Exit codes: 0; 2 for a config error (unknown file, key or grid axis, malformed binding: one
line on stderr, nothing run, no results folder); 1 when no point succeeded and one errored.
"""

import difflib
import importlib.util  # noqa: F401  (gin 0.5.0 uses importlib.util without importing it)
import inspect
import os
import sys
import tokenize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
import gin

from experiments import harness, plots, points  # noqa: F401  (registers configurables)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", None, "Gin config file(s); later override earlier.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'grid.batch=[8, 16]'.")
flags.DEFINE_string("results_root", "results", "Where results/<experiment>/<time>/ goes.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's id.")

DEFAULT_GIN = "quickstart.gin"


@gin.configurable
def experiment(name: str = gin.REQUIRED, points=gin.REQUIRED, measure=gin.REQUIRED,
               fixed=None, summary_keys=("decode_tokens_per_s", "prefill_s", "kv_bytes"),
               baseline=("attention", "none"), baseline_metric="decode_tokens_per_s",
               match=(), plot_specs=(), max_seconds=None):
  """What to run: `measure(**fixed, **point)` for each of `points` (see harness.grid).

  baseline: (column, value) whose rows are the reference for the ratio column
  `<baseline_metric>_vs_<value>`, matched on the `match` columns. plot_specs: tuples
  (x, y, series columns, log y) drawn with plots.line_plot. max_seconds: points not started
  by then are recorded as skipped (results so far are saved after every point anyway).
  """
  return dict(name=name, points=points, measure=measure, fixed=dict(fixed or {}),
              summary_keys=summary_keys, baseline=baseline, baseline_metric=baseline_metric,
              match=tuple(match), plot_specs=plot_specs, max_seconds=max_seconds)


def split_gin_shorthand(argv):
  """Turns `--gin.X=Y` arguments into `--gin_bindings=X=Y`."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      out.append("--gin_bindings=" + arg[len("--gin."):])
    else:
      out.append(arg)
  return out


class ConfigError(Exception):
  """A bad config file, binding or grid axis: printed as one line, exit code 2, nothing run."""


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def resolve_gin_file(path: str) -> str:
  for candidate in (path, os.path.join(CONFIGS, path), os.path.join(CONFIGS, path + ".gin")):
    if os.path.isfile(candidate):
      return candidate
  raise ConfigError(f"--gin_file={path!r} not found (looked in the working directory and "
                    f"{CONFIGS}); available: {sorted(os.listdir(CONFIGS))}")


def parse_config(files, bindings) -> None:
  """Parses the files, then each binding on its own (so an error names the binding); raises
  ConfigError with gin's message on one line."""
  gin.clear_config()
  if CONFIGS not in gin.config._LOCATION_PREFIXES:  # lets configs `include` each other by name
    gin.add_config_file_search_path(CONFIGS)
  files = [resolve_gin_file(f) for f in (files or [DEFAULT_GIN])]
  try:
    gin.parse_config_files_and_bindings(files, None, finalize_config=False)
  except Exception as e:  # gin raises ValueError, KeyError, SyntaxError, TokenError, ...
    raise ConfigError(f"gin config error in {', '.join(files)}: {_one_line(e)}") from None
  for binding in bindings or ():
    try:
      gin.parse_config(binding)
    except tokenize.TokenError as e:     # unbalanced brackets or quotes
      raise ConfigError(f"gin binding {binding!r} is malformed: {e.args[0]}") from None
    except Exception as e:
      raise ConfigError(f"gin binding {binding!r}: {_one_line(e)}") from None
  gin.finalize()


def check_points(spec) -> None:
  """Every grid axis and fixed key must be a parameter of the measure function (a typo such
  as `grid.bach` would otherwise become a new axis that every point fails on)."""
  measure = spec["measure"]
  try:
    params = inspect.signature(measure).parameters
  except (TypeError, ValueError):
    return
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  name = getattr(measure, "__name__", repr(measure))
  accepted = [p for p, v in params.items() if v.kind != inspect.Parameter.VAR_POSITIONAL]
  points = list(spec["points"])
  if not points:
    raise ConfigError(f"experiment {spec['name']!r} has no points (an empty grid?)")
  for where, keys in [("experiment.fixed", spec["fixed"])] + [("grid", p) for p in points]:
    for key in keys:
      if key not in params:
        close = difflib.get_close_matches(key, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where} key {key!r} is not a parameter of {name}{hint}; its "
                          f"parameters: {accepted}")


def run_experiment(files, bindings, results_root: str, argv=()) -> tuple[str, list]:
  """Parses and checks the config, runs the sweep, writes the results folder; returns
  (its path, the rows). Config errors (ConfigError) are raised before any point runs."""
  parse_config(files, bindings)
  try:
    spec = experiment()
  except Exception as e:  # e.g. grid() rejecting an axis, a missing required binding
    raise ConfigError(f"experiment config: {_one_line(e)}") from None
  check_points(spec)
  env = harness.environment(list(argv))
  directory = harness.results_dir(results_root, spec["name"])

  import jax
  writer = jax.process_index() == 0       # on several hosts, only process 0 writes

  def save(rows):
    if not writer:
      return
    if spec["baseline"] and spec["match"]:
      key, value = spec["baseline"]
      harness.add_ratio_to_baseline(rows, spec["baseline_metric"], key, value, spec["match"])
    harness.write_results(directory, rows, env, gin.operative_config_str())

  rows = harness.run_sweep(spec["points"], spec["measure"], spec["fixed"],
                           spec["summary_keys"], on_row=save, max_seconds=spec["max_seconds"])
  save(rows)
  written = []
  for x, y, series, logy in (spec["plot_specs"] if writer else ()):
    path = plots.line_plot(rows, x, y, list(series), os.path.join(directory, f"{y}_vs_{x}.png"),
                           title=f"{spec['name']} ({env['device_kind']})", logy=logy)
    if path:
      written.append(path)
  counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "OOM", "error")}
  print(f"{spec['name']}: {counts['ok']} ok, {counts['OOM']} OOM, {counts['error']} error")
  print(f"table: {os.path.join(directory, 'rows.csv')}")
  print(f"columns: {os.path.join(directory, 'columns.md')}")
  for path in written:
    print(f"plot:  {path}")
  return directory, rows


def run(files, bindings, results_root: str, argv=()) -> str:
  """`run_experiment` returning the results folder only."""
  return run_experiment(files, bindings, results_root, argv)[0]


def exit_code(rows) -> int:
  """0, or 1 when no point succeeded and at least one errored (OOM points are results)."""
  statuses = {r["status"] for r in rows}
  return 1 if "ok" not in statuses and "error" in statuses else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import matplotlib
  matplotlib.use("Agg")                  # the command line only writes files
  if FLAGS.distributed:
    import jax
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  try:
    _, rows = run_experiment(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.results_root, sys.argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  code = exit_code(rows)
  if code:
    print("error: every point that ran failed (see the error column of rows.csv)",
          file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.argv = split_gin_shorthand(sys.argv)
  app.run(main)
