"""The per-operation profile attributes every compiled operation of a train step to the kind of work it does."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from segjax import profile
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model
from segjax.train.state import create_train_state
from segjax.train.step import make_train_step


def _unet_step(size: int = 64, kernels: str = "auto"):
  model = get_model("unet", num_classes=2, depth=2, base_width=4, norm="batch", kernels=kernels)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.adam(1e-3), (1, size, size, 1))
  batch = {"image": jnp.ones((2, size, size, 1)), "label": jnp.zeros((2, size, size), jnp.int32)}
  return jax.jit(make_train_step(softmax_cross_entropy)), state, batch


def _convolutions_by_category(hlo_text: str) -> collections.Counter:
  """How many HLO convolutions and matrix products (XLA rewrites some 1x1 convolutions into those) each category
  holds; a fused one counts in its fusion's category."""
  by_name, computations = profile.parse_hlo(hlo_text)
  categories = profile.categorize(hlo_text)
  fused = {i.name for f in by_name.values() if f.calls for i in computations.get(f.calls, [])}
  counts = collections.Counter()
  for name, instruction in by_name.items():
    if name not in fused:
      members = [instruction, *computations.get(instruction.calls, [])] if instruction.calls else [instruction]
      counts[categories[name]] += sum(m.opcode in ("convolution", "dot") for m in members)
  return counts


def test_xla_gradients_of_each_layer_are_told_apart():
  """With Flax's layers (XLA's own convolution gradients), each layer has one forward convolution, one weight
  gradient and (except the first, whose input needs none) one input gradient, and the profile finds exactly those."""
  step, state, batch = _unet_step(kernels="xla")
  counts = _convolutions_by_category(step.lower(state, batch).compile().as_text())
  kernels = [k for k in jax.tree_util.tree_leaves_with_path(state.params) if "kernel" in jax.tree_util.keystr(k[0])]
  up = sum("upsample" in jax.tree_util.keystr(path) for path, _ in kernels)
  convolutions = len(kernels) - up  # 3x3 layers and the 1x1 classifier
  assert up == 2 and convolutions == 11
  assert counts["convolution, forward"] == convolutions
  assert counts["convolution, weight gradient"] == convolutions
  assert counts["convolution, input gradient"] == convolutions - 1
  assert counts["up-convolution, forward"] == counts["up-convolution, weight gradient"] == up
  assert counts["up-convolution, input gradient"] == up


def test_cpu_forms_name_their_gradients():
  """segjax's CPU layers: the banded weight-gradient loops and the matrix products of the 1x1 and up-convolutions
  land in the gradient categories, BatchNorm, pooling and skip concatenation in theirs, Adam outside the model."""
  step, state, batch = _unet_step()
  text = step.lower(state, batch).compile().as_text()
  by_name, computations = profile.parse_hlo(text)
  categories = profile.categorize(text)
  fused = {i.name for f in by_name.values() if f.calls for i in computations.get(f.calls, [])}
  loops = [n for n, i in by_name.items() if "/while/" in i.op_name and "/conv/" in i.op_name and n not in fused]
  assert loops and {categories[n] for n in loops} == {"convolution, weight gradient"}
  whiles = [n for n, i in by_name.items() if i.opcode == "while"]
  assert whiles and {categories[n] for n in whiles} == {profile.CONTROL_FLOW}  # their bodies are counted instead
  assert {
    "convolution, forward",
    "convolution, input gradient",
    "convolution, weight gradient",
    "up-convolution, forward",
    "up-convolution, input gradient",
    "up-convolution, weight gradient",
    "normalisation, forward",
    "normalisation, backward",
    "pooling, forward",
    "pooling, backward",
    "concatenation, forward",
    profile.OUTSIDE_MODEL,
  } <= set(categories.values())


def test_weight_gradient_on_an_image_no_larger_than_the_kernel_span():
  """At ResNet's last stage (7x7 images, 3x3 kernels) image and kernel are close in size: the input gradient's
  output is 7x7 with a 3x3 window, the weight gradient's output 3x3 with a 7x7 window."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(8, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x)))

  x = jnp.ones((2, 7, 7, 8))
  params = Net().init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(Net().apply(p, x) ** 2)))
  counts = _convolutions_by_category(grad.lower(params).compile().as_text())
  assert counts["convolution, forward"] == 2
  assert counts["convolution, weight gradient"] == 2
  assert counts["convolution, input gradient"] == 1


def test_profile_step_times_every_operation_and_returns_the_carry():
  step, state, batch = _unet_step()
  times, state = profile.profile_step(jax.jit(step, donate_argnums=0), state, batch, calls=2)
  assert int(state.step) == 3  # the untraced call and the two traced ones
  assert "unattributed" not in times
  assert list(times.values()) == sorted(times.values(), reverse=True)
  for kind in ("convolution, forward", "convolution, weight gradient", "normalisation, forward"):
    assert times[kind] > 0
  merged = profile.merge(times)
  assert merged["convolution, backward"] == pytest.approx(
    sum(v for k, v in times.items() if "convolution" in k and "forward" not in k)
  )
  assert sum(merged.values()) == pytest.approx(sum(times.values()))


def test_pytorch_profile_uses_the_same_kinds():
  torch = pytest.importorskip("torch")
  from experiments import benchmark

  model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)
  )
  optimizer = torch.optim.SGD(model.parameters(), 0.1)
  x, y = torch.rand(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))

  def step(_, __=None):
    optimizer.zero_grad()
    with torch.profiler.record_function(benchmark._TORCH_PHASES[0]):
      logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    with torch.profiler.record_function(benchmark._TORCH_PHASES[1]):
      loss.backward()
    optimizer.step()

  times = benchmark.profile_torch(torch, step)
  for kind in ("convolution, forward", "convolution, backward", "normalisation, backward", profile.OUTSIDE_MODEL):
    assert times[kind] > 0
  segjax_times = {"convolution, input gradient": 2.0, "pooling, forward": 1.0}
  table = benchmark.format_profiles(
    [
      {"case": "c", "phase": "train", "framework": "segjax", "median_ms": 3.5, "profile_ms": segjax_times},
      {"case": "c", "phase": "train, kernels constant", "framework": "segjax", "median_ms": 1.5},
      {"case": "c", "phase": "train", "framework": "torch eager", "median_ms": 2.5, "profile_ms": times},
    ]
  )
  assert "| convolution, backward | 2.0 |" in table and "| total | 3.0 |" in table
  assert "(no kernel gradients): 1.5 ms; the full step: 3.5 ms; PyTorch eager's full step: 2.5 ms" in table


def _event(name: str, start: float, duration: float, module: str | None = "m") -> dict:
  args = {"hlo_module": module, "hlo_op": name} if module else {}
  return {"ph": "X", "name": name, "ts": start, "dur": duration, "args": args}


def test_asynchronous_operations_end_at_their_completion_and_overlaps_split_the_wall_time():
  events = [
    _event("a", 0, 10),
    _event("end: a", 10, 0.1, None),
    _event("b", 5, 1),  # launched at 5, runs on the thread pool, completes at 25
    _event("end: b", 25, 0.1, None),
    _event("c", 0, 30, module="another"),
    _event("a", 40, 2),  # a second call of a, no overlap
    _event("end: a", 42, 0.1, None),
  ]
  intervals = profile.operation_intervals(events, "m")
  assert sorted(intervals) == [("a", 0, 10), ("a", 40, 42), ("b", 5, 25)]
  shares = profile.wall_time_shares(intervals)
  assert shares == {"a": pytest.approx(5 + 2.5 + 2), "b": pytest.approx(2.5 + 15)}
  assert sum(shares.values()) == pytest.approx(25 + 2)  # the busy wall time


def test_a_trace_without_the_steps_operations_is_refused():
  events = [_event("fusion.1", 0, 5, module="jit_other")]
  with pytest.raises(RuntimeError, match="no operation of the step's compiled module"):
    profile._module_name(events, {"fusion.7": "convolution, forward"})
  assert profile._module_name(events, {"fusion.1": "convolution, forward"}) == "jit_other"
