"""One registry mechanism for everything a config names: models, losses, evaluators, augmentations, data sets,
optimizers and schedules.

A :class:`Registry` maps names to implementations and keeps per-entry metadata (a loss's number of logits, the source
features an evaluator reads, a geometric augmentation's coordinate map) beside them instead of in side tables. It is a
mutable mapping, so ``LOSSES["mine"] = fn`` registers as well as the decorator form, and every registry refuses a name
twice and reports an unknown name with the same one-line error, naming the config key and the known names.

Example:
  >>> from segjax.registry import Registry
  >>> ACTIVATIONS = Registry("activation", "model.kwargs.activation")
  >>> @ACTIVATIONS.register("relu6", bounded=True)
  ... def relu6(x):
  ...   return min(max(x, 0), 6)
  >>> ACTIVATIONS.lookup("relu6")(9), ACTIVATIONS.metadata("relu6")["bounded"]
  (6, True)

Research code registers its own entries in a module named in ``config.imports``; :func:`import_modules` imports them
before the config's names are looked up.
"""

import importlib
import re
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from segjax.errors import SegjaxError

T = TypeVar("T")


def natural_key(name: str) -> list[str | int]:
  """Sort key with numbers in numeric order: ``resnet18`` before ``resnet101``."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class Registry(MutableMapping[str, T], Generic[T]):
  """Names of one kind of implementation, in registration order, each with its metadata.

  Attributes:
    kind: what the entries are, for messages (``'loss'``).
    config_key: the config key that names an entry (``'loss'``, ``'model.name'``).
  """

  def __init__(self, kind: str, config_key: str, entries: dict[str, T] | None = None):
    self.kind = kind
    self.config_key = config_key
    self._entries: dict[str, T] = {}
    self._metadata: dict[str, dict[str, Any]] = {}
    for name, value in (entries or {}).items():
      self.register(name, value)

  def register(self, name: str, value: T | None = None, /, **metadata: Any) -> Any:
    """Registers ``value`` under ``name`` with ``metadata``; without ``value``, a decorator that does so and returns
    its argument unchanged.

    Raises:
      ValueError: if ``name`` is already registered (remove it first to replace it).
    """

    def add(entry: T) -> T:
      if not isinstance(name, str) or not name:
        raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = entry
      self._metadata[name] = dict(metadata)
      return entry

    return add if value is None else add(value)

  def lookup(self, name: Any) -> T:
    """The entry ``name``; a one-line SegjaxError naming the config key and the known names otherwise."""
    if not isinstance(name, str) or name not in self._entries:
      raise self.unknown(name)
    return self._entries[name]

  def unknown(self, name: Any) -> SegjaxError:
    """The error for a name this registry does not have."""
    return SegjaxError(
      f"unknown {self.kind} {name!r} (config key {self.config_key}); available: {', '.join(self.names())}."
    )

  def metadata(self, name: str) -> MappingProxyType:
    """The read-only metadata ``name`` was registered with (empty when none); the unknown-name error otherwise."""
    self.lookup(name)
    return MappingProxyType(self._metadata[name])

  def names(self) -> list[str]:
    """The registered names, sorted with numbers in numeric order."""
    return sorted(self._entries, key=natural_key)

  def where(self, predicate: Callable[[MappingProxyType], bool]) -> tuple[str, ...]:
    """The names whose metadata satisfies ``predicate``, in registration order."""
    return tuple(name for name in self._entries if predicate(MappingProxyType(self._metadata[name])))

  def copy(self) -> "Registry[T]":
    """A new registry with the same kind, entries and metadata (e.g. to register into in a test)."""
    new = Registry(self.kind, self.config_key)
    for name, entry in self._entries.items():
      new.register(name, entry, **self._metadata[name])
    return new

  # MutableMapping: ``registry[name]`` is the raw entry (KeyError when absent), assignment registers.
  def __getitem__(self, name: str) -> T:
    return self._entries[name]

  def __setitem__(self, name: str, value: T) -> None:
    self.register(name, value)

  def __delitem__(self, name: str) -> None:
    del self._entries[name]
    del self._metadata[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"


def import_modules(names: Iterable[str] | None) -> None:
  """Imports the modules named in ``config.imports`` (a research project's models, losses or data sets, which
  register themselves on import); SegjaxError names a module that cannot be imported."""
  for name in names or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise SegjaxError(
        f"cannot import module '{name}' (config key imports): {e}; make it importable (PYTHONPATH) or remove it."
      ) from e
