"""segjax's entry points (``python -m experiments.<name>``).

Run as a program, each first restarts itself with glibc's allocator tuned for XLA:CPU (segjax.host; about 15% off a
CPU train step; ``SEGJAX_HOST_ALLOCATOR=default`` keeps glibc's defaults). Importing this package from other code
(tests, notebooks) changes nothing.
"""

import sys

_ARGV = sys.orig_argv
if "-m" in _ARGV[1:-1] and _ARGV[_ARGV.index("-m", 1) + 1].startswith("experiments."):
  from segjax import host
  from segjax.errors import SegjaxError

  try:
    host.reexec_with_tuned_allocator()
  except SegjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
