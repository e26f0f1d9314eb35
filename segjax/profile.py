"""Where a compiled step's time goes: a per-operation profile of an XLA executable, grouped by kind of work.

:func:`profile_step` runs a jitted function under ``jax.profiler``, reads the trace's per-operation events (XLA:CPU
names the HLO instruction each one ran) and adds up their wall time per category of :func:`categorize`, which reads the
compiled HLO: the Flax module path in each instruction's ``op_name`` metadata, whether it is in the backward pass
(``transpose(jvp(...))``), and whether it is (or fuses) a convolution or matrix product.

Convolution categories split the forward pass, the input gradient and the weight gradient. segjax's CPU forms name
their gradients with ``jax.named_scope`` (``input_gradient``, ``weight_gradient``: the banded loops of
:mod:`segjax.models.cpu_kernels`); XLA's own gradients are told apart by their shape: a weight gradient's window spans
the image and its output is the kernel, an input gradient's window is the kernel (convolutions), and a weight gradient
contracts the leading (example) axis (matrix products).

Each operation is charged its share of the wall time, from its start to its completion, with operations in flight at
the same moment (on other threads, or queued) splitting that moment evenly (:func:`wall_time_shares`). The categories
therefore add up to the time the step kept the CPU busy, and compare directly with a step time or with PyTorch's
per-operator times.
"""

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from segjax.models.cpu_kernels import INPUT_GRADIENT_SCOPE, WEIGHT_GRADIENT_SCOPE

OUTSIDE_MODEL = "loss, optimizer and other"
CONTROL_FLOW = "control flow"
"""The category of loops, conditionals and calls: their bodies' operations are traced, and counted, themselves."""
_CONTROL_FLOW_OPCODES = ("while", "conditional", "call")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_MODEL_SCOPE = re.compile(r"(?:^|/)(transpose\()?(?:jvp\()?[A-Z][\w.]*\)*/(.*)$")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction of a compiled module: its name, opcode, ``op_name`` metadata and text."""

  name: str
  opcode: str
  op_name: str
  text: str
  calls: str | None  # the fused computation of a fusion


def parse_hlo(hlo_text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
  """``(instructions by name, instructions by computation)`` of an HLO module's text (``compiled.as_text()``)."""
  by_name, by_computation, computation = {}, {}, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      match = _COMPUTATION.match(line)
      computation = match.group(1) if match else None
      if computation:
        by_computation[computation] = []
      continue
    match = _INSTRUCTION.match(line)
    if not match or computation is None:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line) if match.group(3) == "fusion" else None
    instruction = Instruction(
      match.group(1), match.group(3), op_name.group(1) if op_name else "", line, calls.group(1) if calls else None
    )
    by_name[instruction.name] = instruction
    by_computation[computation].append(instruction)
  return by_name, by_computation


def _is_weight_gradient_convolution(text: str) -> bool:
  """Whether an HLO convolution computes a kernel gradient: its window (the output gradient's image) covers more
  pixels than its output (the kernel). An input gradient's window is the kernel and its output the image."""
  window = re.search(r"window=\{size=([\dx]+)", text)
  labels = re.search(r"dim_labels=\w+_\w+->(\w+)", text)
  shape = re.search(r"= \w+\[([\d,]*)\]", text)
  if not (window and labels and shape):
    return False
  dims = [int(d) for d in shape.group(1).split(",") if d]
  output_area = math.prod(dims[i] for i, label in enumerate(labels.group(1)) if label.isdigit() and i < len(dims))
  return math.prod(int(size) for size in window.group(1).split("x")) > output_area


def _is_weight_gradient_dot(text: str) -> bool:
  """Whether a backward HLO dot computes a kernel gradient: it contracts the leading (example) axis."""
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", text)
  return bool(contracting) and "0" in contracting.group(1).split(",")


def _stage(op_name: str, backward: bool, products: list[Instruction]) -> str:
  if WEIGHT_GRADIENT_SCOPE in op_name.split("/"):
    return "weight gradient"
  if INPUT_GRADIENT_SCOPE in op_name.split("/"):
    return "input gradient"
  if not backward:
    return "forward"
  for product in products:
    is_weight = _is_weight_gradient_convolution if product.opcode == "convolution" else _is_weight_gradient_dot
    if is_weight(product.text):
      return "weight gradient"
  return "input gradient"


def category(instruction: Instruction, computations: dict[str, list[Instruction]]) -> str:
  """The kind of work of one instruction (fusions: of the instructions they fuse), e.g. ``'convolution, weight
  gradient'``, ``'normalisation, backward'``, ``'concatenation, forward'``, :data:`OUTSIDE_MODEL` for everything
  outside the model's forward and backward pass, or :data:`CONTROL_FLOW`."""
  if instruction.opcode in _CONTROL_FLOW_OPCODES:
    return CONTROL_FLOW
  inner = computations.get(instruction.calls, []) if instruction.calls else []
  members = [instruction, *inner]
  op_name = instruction.op_name or next((i.op_name for i in reversed(inner) if i.op_name), "")
  scope = _MODEL_SCOPE.search(op_name)
  products = [i for i in members if i.opcode in ("convolution", "dot")]
  if scope is None:
    # XLA drops the metadata of some kernel gradients; their shape still tells them
    weight_gradient = not op_name and products and _stage("", True, products) == "weight gradient"
    return "convolution, weight gradient" if weight_gradient else OUTSIDE_MODEL
  backward, path = bool(scope.group(1)), scope.group(2).split("/")
  if products or WEIGHT_GRADIENT_SCOPE in path or INPUT_GRADIENT_SCOPE in path:
    layer = "up-convolution" if any(p.startswith("upsample") for p in path) else "convolution"
    return f"{layer}, {_stage(op_name, backward, products)}"
  phase = "backward" if backward else "forward"
  if any(p == "norm" or p.startswith(("BatchNorm", "GroupNorm", "InstanceNorm", "bn")) for p in path):
    return f"normalisation, {phase}"
  root = inner[-1].opcode if inner else instruction.opcode
  if instruction.opcode == "concatenate" or root == "concatenate" or path[-1] == "concatenate":
    return f"concatenation, {phase}"
  if any(i.opcode in ("reduce-window", "select-and-scatter") for i in members) or any("pool" in p for p in path):
    return f"pooling, {phase}"
  return f"element-wise and other, {phase}"


def categorize(hlo_text: str) -> dict[str, str]:
  """The :func:`category` of every instruction of a compiled HLO module, by instruction name."""
  by_name, computations = parse_hlo(hlo_text)
  return {name: category(instruction, computations) for name, instruction in by_name.items()}


def operation_intervals(trace_events: list[dict], module: str) -> list[tuple[str, float, float]]:
  """``(instruction, start, end)`` in microseconds for each operation of ``module`` in a Chrome-format trace (the
  ``traceEvents`` of ``jax.profiler``'s ``*.trace.json.gz``).

  XLA:CPU's executor marks an operation's start (an event named after its instruction, with ``hlo_op`` and
  ``hlo_module`` arguments) and its completion (an event ``'end: <instruction>'``). Most operations complete within
  their start event, but those it runs asynchronously (its own convolution kernels and matrix products, spread over
  the thread pool) return at once and complete later, so an operation ends at its completion mark.
  """
  started = collections.defaultdict(collections.deque)
  intervals = []
  for event in sorted((e for e in trace_events if e.get("ph") == "X"), key=lambda e: float(e.get("ts", 0.0))):
    args, name = event.get("args") or {}, event.get("name", "")
    start = float(event.get("ts", 0.0))
    if args.get("hlo_module") == module and name == args.get("hlo_op"):
      started[name].append(len(intervals))
      intervals.append((name, start, start + float(event.get("dur", 0.0))))
    elif name.startswith("end: ") and started[name[5:]]:
      index = started[name[5:]].popleft()
      op, first, end = intervals[index]
      intervals[index] = (op, first, max(end, start))
  return intervals


def wall_time_shares(intervals: list[tuple[str, float, float]]) -> collections.Counter:
  """Each operation's share of the wall time: at every instant the operations in flight split it evenly, so the
  shares add up to the time anything was running, however many threads ran them."""
  boundaries = sorted(
    [(start, 1, i) for i, (_, start, _) in enumerate(intervals)]
    + [(end, 0, i) for i, (_, _, end) in enumerate(intervals)]
  )
  shares, active, previous = collections.Counter(), set(), None
  for time, is_start, index in boundaries:  # ends sort before starts at the same instant
    if active and previous is not None and time > previous:
      for i in active:
        shares[intervals[i][0]] += (time - previous) / len(active)
    previous = time
    (active.add if is_start else active.discard)(index)
  return shares


def _read_trace(log_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {log_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    return json.load(f)["traceEvents"]


def profile_step(step: Callable, carry: Any, *args, calls: int = 2) -> tuple[dict[str, float], Any]:
  """Milliseconds of wall time per call of jitted ``step`` by :func:`category`, from ``calls`` calls under
  ``jax.profiler``.

  ``step(carry, *args)`` must return ``(carry, ...)``, like a train step (the carry may be donated); it is called once
  before the trace so that compilation is not profiled. Returns ``(milliseconds by category, final carry)``; the
  categories are sorted by time, and operations the trace names but the compiled module lacks are ``'unattributed'``.
  """
  compiled = step.lower(carry, *args).compile()  # run directly below: the step is compiled once, here
  categories = categorize(compiled.as_text())
  carry = jax.block_until_ready(compiled(carry, *args))[0]
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    try:
      for _ in range(calls):
        carry = jax.block_until_ready(compiled(carry, *args))[0]
    finally:
      jax.profiler.stop_trace()
    events = _read_trace(log_dir)
  intervals = operation_intervals(events, _module_name(events, categories))
  totals = collections.Counter()
  for name, micros in wall_time_shares([i for i in intervals if categories.get(i[0]) != CONTROL_FLOW]).items():
    totals[categories.get(name, "unattributed")] += micros / 1e3 / calls
  return dict(totals.most_common()), carry


def _module_name(events: list[dict], categories: dict[str, str]) -> str:
  """The traced module whose instruction names best match the compiled module's (the step's own module)."""
  hits = collections.Counter()
  for event in events:
    args = event.get("args") or {}
    if "hlo_module" in args and args.get("hlo_op") in categories:
      hits[args["hlo_module"]] += 1
  if not hits:
    raise RuntimeError("the profiler trace has no operation of the step's compiled module (is this XLA:CPU?)")
  return hits.most_common(1)[0][0]


def coarse(category_name: str) -> str:
  """A :func:`category` at the grain a PyTorch profile also has: up-convolutions counted with convolutions, and a
  convolution's input and weight gradients together (PyTorch runs both in one ``convolution_backward``)."""
  kind, _, stage = category_name.partition(", ")
  if kind in ("convolution", "up-convolution"):
    return "convolution, forward" if stage == "forward" else "convolution, backward"
  return category_name


def merge(times: dict[str, float], grouping: Callable[[str], str] = coarse) -> dict[str, float]:
  """``times`` (milliseconds by category) summed by ``grouping(category)``, largest first."""
  merged = collections.Counter()
  for name, ms in times.items():
    merged[grouping(name)] += ms
  return dict(merged.most_common())
