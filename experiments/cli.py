"""What every entry point shares: a readable check of --config, and SegjaxError as one line instead of a traceback."""

import glob
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
