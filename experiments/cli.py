"""What every entry point shares: a readable check of --config, and SegjaxError as one line instead of a traceback."""

import difflib
import glob
import importlib.util
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from segjax.errors import SegjaxError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def check_config_argument(argv: list[str]) -> None:
  """Exits with a one-line message if ``--config`` names a file that does not exist (before absl parses it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      available = sorted(
        os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("__init__.py")
      )
      fail(f"config file '{path}' does not exist (--config); available: {', '.join(available)}.")
    with open(path) as f:
      source = f.read()
    try:
      compile(source, path, "exec")
    except SyntaxError as e:
      fail(f"config file '{path}' line {e.lineno}: {e.msg}; fix the file.")
    check_override_keys(argv, path, value.split(":", 1)[1] if ":" in value else None)


def check_override_keys(argv: list[str], path: str, variant: str | None) -> None:
  """Exits with a one-line message naming the first ``--config.<key>=`` override whose key the config lacks, with the
  closest existing key, instead of the flag parser's tracebacks."""
  overrides = [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
  if not overrides:
    return
  try:
    config = load_config_file(path, variant)
  except Exception:  # noqa: BLE001 - the flag parser reports errors inside the file itself
    return
  for key in overrides:
    node, walked = config, []
    for part in key.split("."):
      names = list(node.keys()) if hasattr(node, "keys") else []
      if part not in names:
        where = ".".join(walked) or "the config"
        close = difflib.get_close_matches(part, names, n=1)
        hint = f"; did you mean '{'.'.join([*walked, close[0]])}'?" if close else f"; {where} has: {', '.join(names)}."
        fail(f"unknown config key '{key}' (--config.{key}) in {path}{hint}")
      node, walked = node[part], [*walked, part]


def load_config_file(path: str, variant: str | None = None):
  """``get_config()`` (or ``get_config(variant)``) of the config file at ``path``."""
  spec = importlib.util.spec_from_file_location("_segjax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant is not None else module.get_config()


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)`` with the config check first and SegjaxError printed as ``error: <message>``, exit 2."""
  check_config_argument(sys.argv)

  def guarded(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every write at INFO; keep the progress bar readable
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except SegjaxError as e:
      fail(str(e))

  app.run(guarded)
