"""Times segjax's compiled train steps and inference against PyTorch on the same models, batches, loss and optimizer.

  python -m experiments.benchmark                                  # the three cases below, table + BENCHMARK.json
  python -m experiments.benchmark --cases=unet --steps=20 --json=unet.json
  python -m experiments.benchmark --dtype=bfloat16 --notorch       # on an accelerator

Cases: ``unet`` (same-padded, base width 32, depth 4, BN, batch 4 of 256x256x1, 2 classes, Adam), ``unet_valid``
(the paper's U-Net, one 572x572 tile, SGD momentum 0.99), ``resnet50`` (batch 16 of 224x224x3, 1000 classes, SGD
momentum 0.9). For each: compile time, median step time over --steps steps after warm-up, images/s, XLA's FLOPs of
the step, achieved GFLOP/s and its fraction of a measured matrix-multiply peak; with torch installed also PyTorch
eager and ``torch.compile`` (channels-last) and the ratio segjax / PyTorch eager in images/s.
"""

import dataclasses
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from segjax import benchmark, host, profile
from segjax.errors import SegjaxError
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model
from segjax.train.state import create_train_state
from segjax.train.step import make_train_step, predict_logits

_CASES = flags.DEFINE_list("cases", ["unet", "unet_valid", "resnet50", "input"], "Benchmark cases to run.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) one.")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time PyTorch (eager and torch.compile) when it is installed.")
_TORCH_COMPILE = flags.DEFINE_boolean("torch_compile", True, "Include torch.compile.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "segjax activation dtype.")
_JSON = flags.DEFINE_string("json", "BENCHMARK.json", "Where to write the results as JSON ('' for none).")
_INPUT_CONFIG = config_flags.DEFINE_config_file(
  "input_config",
  "experiments/configs/synthetic_cells.py",
  "Experiment whose input pipeline the 'input' case times against its train step (default: the default experiment).",
)
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 100, "Host batches timed by the 'input' case.")
_PROFILE = flags.DEFINE_boolean(
  "profile",
  False,
  "Also profile each train step by kind of operation (segjax.profile; PyTorch eager's with torch.profiler).",
)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: str
  kwargs: dict
  batch: int
  size: int
  channels: int
  classes: int
  optimizer: str  # 'adam' or 'sgd:<momentum>'
  classifier: bool = False


CASES = {
  "unet": Case("unet", "unet", {"depth": 4, "base_width": 32, "norm": "batch"}, 4, 256, 1, 2, "adam"),
  # the base width of the real-data configs (folder_unet, dsb2018_unet, reference_comparison), at folder_unet's batch
  "unet16": Case("unet16", "unet", {"depth": 4, "base_width": 16, "norm": "batch"}, 8, 256, 1, 2, "adam"),
  "unet_valid": Case("unet_valid", "unet_valid", {}, 1, 572, 1, 2, "sgd:0.99"),
  "resnet50": Case("resnet50", "resnet50", {}, 16, 224, 3, 1000, "sgd:0.9", classifier=True),
}


def _jax_optimizer(spec: str) -> optax.GradientTransformation:
  return optax.adam(1e-4) if spec == "adam" else optax.sgd(1e-3, momentum=float(spec.split(":")[1]))


def _classifier_step(state, batch):
  def objective(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean(), updates

  (loss, updates), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), {"loss": loss}


def without_kernel_gradients(apply_fn: Callable) -> Callable:
  """``apply_fn`` with every ``kernel`` parameter under ``stop_gradient``: a train step through it computes the
  forward pass, the input gradients and the other parameters' gradients, but no convolution kernel gradient."""

  def apply(variables, *args, **kwargs):
    params = jax.tree_util.tree_map_with_path(
      lambda path, value: jax.lax.stop_gradient(value) if "kernel" in jax.tree_util.keystr(path) else value,
      variables["params"],
    )
    return apply_fn({**variables, "params": params}, *args, **kwargs)

  return apply


def run_jax(case: Case, dtype, peak: float) -> list[dict]:
  """The train step and eval-mode inference of ``case`` in segjax: one row each."""
  model = get_model(case.model, num_classes=case.classes, dtype=dtype, **case.kwargs)
  shape = (case.batch, case.size, case.size, case.channels)
  state = create_train_state(jax.random.PRNGKey(0), model, _jax_optimizer(case.optimizer), (1, *shape[1:]))
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random(shape, np.float32))
  # labels at the input's size: the step centre-crops them to the unpadded U-Net's smaller output
  label_shape = (case.batch,) if case.classifier else shape[:3]
  batch = {"image": image, "label": jnp.asarray(rng.integers(0, case.classes, label_shape).astype(np.int32))}

  train_step = make_train_step(softmax_cross_entropy)
  step = jax.jit(lambda s, b: (_classifier_step if case.classifier else train_step)(s, b), donate_argnums=0)
  # FLOPs counted on the XLA form of the same model (benchmark.model_flops), before the step donates the state
  xla_form = model.clone(kernels="xla")
  flops = benchmark.model_flops(step, state.replace(apply_fn=xla_form.apply), batch)
  compile_s = benchmark.compile_time(step, state, batch)
  _, times, state = benchmark.time_steps(step, state, batch, steps=_STEPS.value, warmup=_WARMUP.value)
  rows = [_row(case, "train", "segjax", compile_s, times, flops, peak)]
  if _PROFILE.value:
    rows[0]["profile_ms"], state = profile.profile_step(step, state, batch)
    # the same step with every convolution kernel held constant: what the rest costs (BENCHMARKS.md, the floor)
    floor_state = state.replace(apply_fn=without_kernel_gradients(state.apply_fn))  # a new static field: recompiles
    first, times, floor_state = benchmark.time_steps(step, floor_state, batch, steps=_STEPS.value, warmup=_WARMUP.value)
    rows.append(_row(case, "train, kernels constant", "segjax", first - float(np.median(times)), times, None, peak))
    state = floor_state.replace(apply_fn=state.apply_fn)
  infer = jax.jit(lambda s, x: (s, predict_logits(s, x)))
  compile_s = benchmark.compile_time(infer, state, image)
  flops = benchmark.model_flops(infer, state.replace(apply_fn=xla_form.apply), image)
  _, times, _ = benchmark.time_steps(infer, state, image, steps=_STEPS.value, warmup=_WARMUP.value)
  rows.append(_row(case, "inference", "segjax", compile_s, times, flops, peak))
  return rows


def _row(case: Case, phase: str, framework: str, compile_s: float, times: list[float], flops, peak) -> dict:
  median = float(np.median(times))
  row = {
    "case": case.name,
    "phase": phase,
    "framework": framework,
    "compile_s": round(compile_s, 2),
    "median_ms": round(median * 1e3, 1),
    "images_per_s": round(case.batch / median, 2),
  }
  if flops:  # XLA's count for the segjax step; PyTorch rows reuse it (same model, same work)
    gflops = flops / median / 1e9
    row.update(gflop=round(flops / 1e9, 1), gflops=round(gflops, 1), peak_fraction=round(gflops / peak, 3))
  return row


_TORCH_PHASES = ("segjax.forward", "segjax.backward")  # record_function regions of run_torch's step: profile_torch


def run_torch(case: Case, torch, compiled: bool, jax_flops: dict, peak: float) -> list[dict]:
  """The same train step in PyTorch, channels-last, eager or ``torch.compile``d."""
  from experiments.torch_models import torch_unet, torchvision_layout_resnet

  torch.manual_seed(0)
  if case.classifier:
    model = torchvision_layout_resnet(torch, True, (3, 4, 6, 3), num_classes=case.classes, seed=0).train()
  else:
    kwargs = CASES[case.name].kwargs
    valid = case.model == "unet_valid"
    model = torch_unet(
      torch,
      depth=kwargs.get("depth", 4),
      width=kwargs.get("base_width", 64),
      in_channels=case.channels,
      num_classes=case.classes,
      valid=valid,
      norm=kwargs.get("norm", "none") == "batch",
    )
  model = model.to(memory_format=torch.channels_last)
  if case.optimizer == "adam":
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
  else:
    optimizer = torch.optim.SGD(model.parameters(), 1e-3, momentum=float(case.optimizer.split(":")[1]))
  x = torch.rand(case.batch, case.channels, case.size, case.size).to(memory_format=torch.channels_last)
  with torch.no_grad():
    out_shape = model(x).shape
  y = torch.randint(0, case.classes, (case.batch,) if case.classifier else (case.batch, *out_shape[2:]))
  forward = torch.compile(model) if compiled else model

  def step(_, __=None):
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function(_TORCH_PHASES[0]):
      logits = forward(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    with torch.profiler.record_function(_TORCH_PHASES[1]):
      loss.backward()
    optimizer.step()
    return (None, loss.detach())

  name = "torch compile" if compiled else "torch eager"
  first, times = _time_torch(step)
  rows = [_row(case, "train", name, first - float(np.median(times)), times, jax_flops.get("train"), peak)]
  if _PROFILE.value and not compiled:
    rows[0]["profile_ms"] = profile_torch(torch, step)
  model.eval()

  def infer(_, __=None):
    with torch.no_grad():
      return (None, forward(x))

  first, times = _time_torch(infer)
  rows.append(_row(case, "inference", name, first - float(np.median(times)), times, jax_flops.get("inference"), peak))
  return rows


def torch_category(op: str, phase: str | None) -> str:
  """The :func:`segjax.profile.coarse` category of a PyTorch operator ``op`` run in ``phase`` (``'forward'``,
  ``'backward'`` or None: outside the model's forward and backward pass)."""
  if phase is None:
    return profile.OUTSIDE_MODEL
  if "convolution" in op:
    return "convolution, backward" if "backward" in op else "convolution, forward"
  if "batch_norm" in op:
    return f"normalisation, {phase}"
  if op == "aten::cat":
    return f"concatenation, {phase}"
  if "max_pool" in op:
    return f"pooling, {phase}"
  return f"element-wise and other, {phase}"


def profile_torch(torch, step, calls: int = 2) -> dict[str, float]:
  """Milliseconds per call of ``step`` by :func:`torch_category`: each operator's own (self) CPU time, in the phase of
  the ``record_function`` region around it."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
    for _ in range(calls):
      step(None)
  times = {}
  for event in trace.events():
    phase, parent = None, event
    while parent is not None and phase is None:
      if parent.name in _TORCH_PHASES:
        phase = "forward" if parent.name == _TORCH_PHASES[0] else "backward"
      parent = parent.cpu_parent
    name = torch_category(event.name, phase)
    times[name] = times.get(name, 0.0) + event.self_cpu_time_total / 1e3 / calls
  return profile.merge(times, lambda name: name)


def format_profiles(rows: list[dict]) -> str:
  """Per case, the profiled train steps side by side at :func:`segjax.profile.coarse` grain, then segjax's own
  categories (a convolution's input and weight gradients apart)."""
  lines = []
  for case in dict.fromkeys(r["case"] for r in rows if "profile_ms" in r):
    profiled = {r["framework"]: r["profile_ms"] for r in rows if r["case"] == case and "profile_ms" in r}
    coarse = {framework: profile.merge(times) for framework, times in profiled.items()}
    frameworks = list(coarse)
    lines += [f"\n{case} train step, wall time by kind of operation (ms per step)"]
    lines += ["| kind | " + " | ".join(frameworks) + " |", "|---|" + "---|" * len(frameworks)]
    kinds = sorted(
      {k for times in coarse.values() for k in times}, key=lambda k: -max(t.get(k, 0) for t in coarse.values())
    )
    for kind in [*kinds, "total"]:
      cells = [sum(t.values()) if kind == "total" else t.get(kind) for t in coarse.values()]
      lines.append(f"| {kind} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
    if "segjax" in profiled:
      detail = ", ".join(f"{k} {v:.1f}" for k, v in profiled["segjax"].items() if k.startswith(("convolution", "up-")))
      lines.append(f"segjax's convolutions in detail (ms): {detail}")
    steps = {(r["framework"], r["phase"]): r["median_ms"] for r in rows if r["case"] == case}
    if ("segjax", "train, kernels constant") in steps:
      lines.append(
        f"segjax's train step with the convolution kernels held constant (no kernel gradients): "
        f"{steps['segjax', 'train, kernels constant']:.1f} ms; the full step: {steps['segjax', 'train']:.1f} ms"
        + (
          f"; PyTorch eager's full step: {steps['torch eager', 'train']:.1f} ms"
          if ("torch eager", "train") in steps
          else ""
        )
      )
  return "\n".join(lines)


def run_input(config) -> list[dict]:
  """The input pipeline of experiment ``config`` against its train step, both as the training loop builds them.

  Times ``--input_batches`` host batches read back to back (after the reader threads' buffer is drained once), and
  the compiled train step on one of them (augmentation included). The pipeline keeps up when its batches/s is well
  above the step's steps/s; the ratio is printed and stored as ``input_to_step_ratio``.
  """
  from segjax.train.setup import build

  experiment = build(config, devices=jax.devices()[:1])
  batches = experiment.training_batches()
  first = next(batches)
  for _ in range(2 * config.data.num_threads):  # what the reader threads buffered while the first was built
    next(batches)
  start = time.perf_counter()
  for _ in range(_INPUT_BATCHES.value):
    next(batches)
  input_times = [(time.perf_counter() - start) / _INPUT_BATCHES.value]

  # the loop's own compiled step (augmentation included) on the state it starts from
  state, batch = experiment.initial_state(), experiment.place_batch(first)
  step = experiment.train_step
  compile_s = benchmark.compile_time(step, state, batch)
  _, step_times, _ = benchmark.time_steps(step, state, batch, steps=_STEPS.value, warmup=_WARMUP.value)
  case = Case(f"input:{config.data.name}", config.model.name, {}, config.batch_size, 0, 0, 0, "")
  rows = [
    _row(case, "input", "segjax", 0.0, input_times, None, 0),
    _row(case, "train", "segjax", compile_s, step_times, None, 0),
  ]
  ratio = float(np.median(step_times)) / input_times[0]
  rows[0]["input_to_step_ratio"] = round(ratio, 1)
  print(
    f"input pipeline of {config.data.name} (batch {config.batch_size}): {1 / input_times[0]:.1f} batches/s; its train "
    f"step: {1 / float(np.median(step_times)):.1f} steps/s; the pipeline is {ratio:.1f}x faster than the step."
  )
  return rows


def _time_torch(step) -> tuple[float, list[float]]:
  start = time.perf_counter()
  step(None)
  first = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    step(None)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    step(None)
    times.append(time.perf_counter() - start)
  return first, times


def format_table(rows: list[dict], peak: float) -> str:
  header = [
    "case",
    "phase",
    "framework",
    "compile s",
    "median ms",
    "images/s",
    "GFLOP",
    "GFLOP/s",
    "% peak",
    "vs eager",
  ]
  eager = {(r["case"], r["phase"]): r["images_per_s"] for r in rows if r["framework"] == "torch eager"}
  lines = [
    f"matrix-multiply peak: {peak:.0f} GFLOP/s ({jax.devices()[0].device_kind}); host allocator: "
    f"{host.allocator_setting()} (segjax.host; PyTorch runs in the same process)",
    "| " + " | ".join(header) + " |",
  ]
  lines.append("|" + "---|" * len(header))
  for r in rows:
    ratio = r["images_per_s"] / eager[(r["case"], r["phase"])] if (r["case"], r["phase"]) in eager else None
    r["vs_torch_eager"] = round(ratio, 2) if ratio else None
    peak_pct = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else ""
    cells = [
      r["case"],
      r["phase"],
      r["framework"],
      f"{r['compile_s']:.1f}",
      f"{r['median_ms']:.1f}",
      f"{r['images_per_s']:.2f}",
      f"{r.get('gflop', '')}",
      f"{r.get('gflops', '')}",
      peak_pct,
      f"{ratio:.2f}x" if ratio else "",
    ]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  peak = benchmark.matmul_peak_gflops(dtype=dtype)
  torch = None
  if _TORCH.value:
    try:
      import torch
    except ImportError:
      print("torch is not installed: timing segjax only")
  rows = []
  for name in _CASES.value:
    if name == "input":
      rows += run_input(_INPUT_CONFIG.value)
      continue
    if name not in CASES:
      raise SegjaxError(f"unknown --cases '{name}'; available: {', '.join([*CASES, 'input'])}.")
    case = CASES[name]
    jax_rows = run_jax(case, dtype, peak)
    rows += jax_rows
    print(json.dumps(jax_rows), flush=True)
    if torch is not None:
      flops = {r["phase"]: r.get("gflop", 0) * 1e9 for r in jax_rows}
      for compiled in (False, True) if _TORCH_COMPILE.value else (False,):
        try:
          torch_rows = run_torch(case, torch, compiled, flops, peak)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler: report and go on
          print(f"PyTorch {'compile' if compiled else 'eager'} failed on {name}: {type(e).__name__}: {e}")
          continue
        rows += torch_rows
        print(json.dumps(torch_rows), flush=True)
  print(format_table(rows, peak))
  if _PROFILE.value:
    print(format_profiles(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      record = {"peak_gflops": peak, "device": str(jax.devices()[0]), "host_allocator": host.allocator_setting()}
      json.dump({**record, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
