"""The one exception type segjax raises for bad user input.

Entry points catch :class:`SegjaxError` and print its message as a single line, so every message must name the
offending file, key or value and say what to do about it.
"""


class SegjaxError(ValueError):
  """Bad user input (config key, model name, file, workdir); the message is shown to the user as is."""
