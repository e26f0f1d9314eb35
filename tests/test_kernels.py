"""The CPU forms of convolution and pooling (segjax.models.cpu_kernels) compute what XLA's ops compute, with the same
parameters, and the models' ``kernels`` field chooses them inside the traced program."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax.config import with_defaults
from segjax.errors import SegjaxError
from segjax.models import cpu_kernels, create_model, get_model, layers


def _assert_same_layer(ours, reference, x, grad_atol):
  """Same parameter tree and initial values, same output, gradients (parameters and input) equal to rounding."""
  params = reference.init(jax.random.PRNGKey(1), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours.init(jax.random.PRNGKey(1), x), params)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
  for a, b in zip(
    jax.grad(loss(ours), argnums=(0, 1))(params, x), jax.grad(loss(reference), argnums=(0, 1))(params, x), strict=True
  ):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=grad_atol), a, b)


@pytest.mark.parametrize("kernels", ["cpu", "auto"])
@pytest.mark.parametrize(
  "strides,size,use_bias,padding", [(1, 9, True, "VALID"), (2, 9, False, "SAME"), (2, 8, True, "VALID")]
)
def test_pointwise_conv_equals_nn_conv_with_the_same_parameters_and_gradients(
  kernels, strides, size, use_bias, padding
):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
  reference = nn.Conv(7, (1, 1), strides=(strides, strides), padding=padding, use_bias=use_bias)
  ours = layers.conv(7, 1, strides=strides, padding=padding, use_bias=use_bias, kernels=kernels)
  _assert_same_layer(ours, reference, x, grad_atol=1e-5)


@pytest.mark.parametrize("kernels", ["cpu", "xla", "auto"])
def test_up_convolution_equals_the_transposed_convolution_with_the_same_parameters_and_gradients(kernels):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  _assert_same_layer(layers.UpConv2x2(4, kernels=kernels), reference, x, grad_atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 1), (1, 1)), ((0, 0), (0, 0))])
@pytest.mark.parametrize("use_bias,channels", [(True, 5), (False, 5), (True, 16)])  # 16: VALID as cropped SAME
def test_conv3x3_equals_nn_conv_with_the_same_parameters_and_gradients(padding, use_bias, channels):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 67, channels))  # 65 or 67 wide: the blocked gradient is used
  reference = nn.Conv(7, (3, 3), padding=padding, use_bias=use_bias)
  ours = layers.conv(7, 3, padding=padding, use_bias=use_bias, kernels="cpu")
  _assert_same_layer(ours, reference, x, grad_atol=1e-4)


@pytest.mark.parametrize(
  "settings",
  [
    {"kernel_size": (3, 3), "strides": 2, "padding": ((1, 1), (1, 1))},  # strided 3x3 (ResNet)
    {"kernel_size": (3, 3), "padding": ((2, 2), (2, 2))},
    {"kernel_size": (7, 7), "strides": 2, "padding": ((3, 3), (3, 3))},  # ResNet's stem
    {"kernel_size": (3, 3), "kernel_dilation": 2},
    {"kernel_size": (1, 1), "feature_group_count": 2},
    {"kernel_size": (1, 1), "padding": ((1, 1), (1, 1))},  # a padded 1x1 is not a matrix product
  ],
)
def test_convolutions_without_a_cpu_form_keep_xlas(settings):
  """The CPU forms cover 1x1 and stride-1 3x3 kernels; every other convolution an ``nn.Conv`` is given runs as XLA's,
  with the same result as Flax's own."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 70, 4))
  kernel_size = settings.pop("kernel_size")
  reference = nn.Conv(6, kernel_size, **settings)
  ours = nn.Conv(6, kernel_size, conv_general_dilated=layers._CONVOLUTIONS["cpu"], **settings)
  _assert_same_layer(ours, reference, x, grad_atol=1e-5)


def test_an_unknown_kernels_value_names_the_config_key():
  with pytest.raises(SegjaxError, match=r"unknown kernels 'gpu' \(config key model.kernels\).*auto, xla, cpu"):
    get_model("unet", num_classes=2, depth=1, base_width=4, kernels="gpu").init(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), train=False
    )


def test_the_config_key_model_kernels_reaches_the_model():
  config = ml_collections.ConfigDict({"name": "unet", "kwargs": {"depth": 2}, "kernels": "xla"})
  assert create_model(config, 2).kernels == "xla"
  config.kernels = "auto"
  assert create_model(config, 2).kernels == "auto"
  # a config saved before the key existed: with_defaults (applied to every restored config) fills it in
  old = ml_collections.ConfigDict({"data": {"name": "synthetic_cells"}, "model": {"name": "unet", "kwargs": {}}})
  assert create_model(with_defaults(old).model, 2).kernels == "auto"


def _grad_function(kernels: str):
  model = get_model("unet", num_classes=2, depth=2, base_width=8, kernels=kernels)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 1))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(logits))

  return jax.jit(jax.grad(loss)), variables["params"]


def test_auto_selects_the_cpu_forms_inside_the_program_by_the_platform_it_is_lowered_for():
  """``'auto'`` is ``lax.platform_dependent``: lowered for the CPU it computes the CPU forms (whose 3x3 weight
  gradients are ``while`` loops over bands, one per layer at least 64 pixels wide), and an export for a GPU carries
  XLA's convolutions only, though this process runs on the CPU."""
  auto, params = _grad_function("auto")
  loops = lambda platform: jax.export.export(auto, platforms=[platform])(params).mlir_module().count("stablehlo.while")  # noqa: E731
  assert loops("cpu") >= 4  # the two 64-wide layers' 3x3 weight gradients, forward and up path
  assert loops("cuda") == 0
  assert "conditional(" not in auto.lower(params).compile().as_text()  # the platform's branch alone is compiled


def _xla_ops(jaxpr) -> list[str]:
  """The convolutions and max pools that run as XLA's own ops (outside the custom VJPs of the CPU forms): ``'1x1'``,
  ``'3x3'`` (stride 1), ``'up'`` (a transposed convolution) and ``'pool'``, recursively through nested jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith("custom_vjp"):
      continue
    if eqn.primitive.name == "conv_general_dilated":
      rhs_shape, params = eqn.invars[1].aval.shape, eqn.params
      if any(d != 1 for d in params["lhs_dilation"]):
        found.append("up")
      elif rhs_shape[:2] == (1, 1):
        found.append("1x1")
      elif rhs_shape[:2] == (3, 3) and tuple(params["window_strides"]) == (1, 1):
        found.append("3x3")
    elif eqn.primitive.name in ("reduce_window_max", "reduce_window"):
      found.append("pool")
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _xla_ops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _xla_ops(sub)
  return found


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("unet", {"depth": 2, "base_width": 4, "deep_supervision": True}),
    ("unet", {"depth": 2, "base_width": 4, "upsample": "resize"}),
    ("unet_valid", {"depth": 2, "base_width": 4}),
    ("resunet", {"depth": 2, "base_width": 4}),
    ("resnet18_unet", {"encoder_width": 8, "upsample": "transpose", "head_kernel": 1}),
    ("resnet50_unet", {"encoder_width": 8}),
    ("resnet50", {"width": 8}),
    ("resnet20_cifar", {"shortcut": "B"}),
  ],
)
def test_every_convolution_and_pool_of_every_model_takes_the_chosen_form(name, kwargs):
  """With ``kernels='cpu'`` no 1x1, stride-1 3x3 or transposed convolution and no max pool of the model's training
  forward pass is left to XLA's own op (the 3x3 ones are inside the custom VJP whose weight gradient is banded); with
  ``'xla'`` they all are."""
  size = 188 if name == "unet_valid" else 64
  x = jnp.zeros((2, size, size, 3))
  ops = {}
  for kernels in ("cpu", "xla"):
    model = get_model(name, num_classes=3, kernels=kernels, **kwargs)
    variables = jax.eval_shape(lambda model=model: model.init(jax.random.PRNGKey(0), x, train=False))

    forward = lambda variables, model=model: model.apply(variables, x, train=True, mutable=["batch_stats"])  # noqa: E731
    ops[kernels] = _xla_ops(jax.make_jaxpr(forward)(variables).jaxpr)
  assert ops["cpu"] == []
  assert "3x3" in ops["xla"] or name.startswith("resnet"), ops["xla"]  # the ResNets' 3x3 stride-1 layers are narrow
  assert "1x1" in ops["xla"] and ("pool" in ops["xla"] or name == "resnet20_cifar")


@pytest.mark.parametrize(
  "name,size,kwargs",
  [  # the U-Nets' first level is at least 64 wide: the blocked gradient is used
    ("unet", 64, {"depth": 2, "base_width": 4}),
    ("unet_valid", 188, {"depth": 2, "base_width": 4}),
    ("resunet", 64, {"depth": 2, "base_width": 4}),
    # ResNet-50's blocks with fewer repeats: strided 1x1 projections, an identity block, the stem's max pool (its
    # 3-6 blocks per stage repeat the same forms and took 50 s to compile in float64)
    ("resnet50", 40, {"width": 8, "stage_sizes": (2, 1, 1, 1)}),
  ],
)
def test_models_are_the_same_with_either_kernels(name, size, kwargs):
  """Same parameters (names, shapes, initial values); the same training-mode logits and gradients, compared in
  float64: in float32 a train-mode BatchNorm over a few pixels (ResNet-50's last stage at 40 px sees 2 examples of
  2x2) amplifies the rounding of sums taken in another order up to 50% of a gradient on some CPUs (an Intel Xeon
  here), while in float64 the two forms agree to the float32 rounding of the CPU forms' accumulation."""
  results = []
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3), jnp.float64)
    for kernels in ("xla", "cpu"):
      model = get_model(name, num_classes=3, kernels=kernels, dtype=jnp.float64, **kwargs)
      variables = model.init(jax.random.PRNGKey(2), x.astype(jnp.float32), train=False)
      wide = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)

      def loss(params, model=model, variables=wide):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), logits

      results.append((variables, *jax.grad(loss, has_aux=True)(wide["params"])))
  (variables, grads, logits), (variables_cpu, grads_cpu, logits_cpu) = results
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables_cpu)
  assert jax.tree_util.tree_leaves(grads)[0].dtype == jnp.float64
  # The CPU forms' weight gradients are accumulated in float32 (their one float32 rounding shows at 1e-7); a wrong
  # form differs at 1e-2 or more.
  np.testing.assert_allclose(logits_cpu, logits, rtol=1e-6, atol=1e-6)
  for u, v in zip(jax.tree_util.tree_leaves(grads_cpu), jax.tree_util.tree_leaves(grads), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6 * float(np.abs(v).max()))


def _assert_sums_close(ours, theirs):
  """Sums of thousands of products, added in another order: equal to float32 rounding of the largest entries."""
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(np.abs(theirs).max()))


def _xla_weight_gradient(x, g, pad):
  return jax.vjp(lambda w: cpu_kernels._xla_conv3x3(x, w, pad), jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype))[
    1
  ](g)[0]


@pytest.mark.parametrize(
  "shape,pad",
  [
    ((2, 13, 70, 5), 1),  # 13 rows: the last band is completed with zero rows
    ((1, 9, 66, 3), 0),  # unpadded: the output is 2 pixels smaller each way
    ((3, 5, 700, 2), 1),  # so wide that a band is one row
    ((4, 6, 8, 4), 0),  # narrow: bands of 8 rows, more than the image has
  ],
)
def test_the_blocked_weight_gradient_equals_xlas(shape, pad):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  out = (shape[1] + 2 * pad - 2, shape[2] + 2 * pad - 2)
  g = jax.random.normal(jax.random.PRNGKey(1), (shape[0], *out, 6))
  ours = jax.jit(cpu_kernels.banded_weight_gradient, static_argnums=(2, 3))(x, g, 3, pad)
  assert ours.shape == (3, 3, shape[-1], 6) and ours.dtype == x.dtype
  _assert_sums_close(ours, _xla_weight_gradient(x, g, pad))


def test_the_blocked_weight_gradient_of_bfloat16_inputs_accumulates_in_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 96, 8)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 96, 4)).astype(jnp.bfloat16)
  ours = cpu_kernels.banded_weight_gradient(x, g, 3, 1)
  exact = _xla_weight_gradient(x.astype(jnp.float32), g.astype(jnp.float32), 1)
  assert ours.dtype == jnp.bfloat16
  # rounding the float32 sum of 3072 products once to bfloat16: within bfloat16's half-ulp of the exact sum
  np.testing.assert_allclose(np.asarray(ours, np.float32), exact, rtol=2**-8, atol=1e-2)


def test_the_blocked_weight_gradient_keeps_a_sharded_batch_sharded():
  """Bands cut rows, not images: on 4 devices each sums its own images and only the (3, 3, C, O) result is reduced."""
  from segjax.train import parallel

  batch = parallel.batch_sharded(parallel.create_mesh())
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 12, 64, 4)), batch)
  g = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (8, 12, 64, 6)), batch)
  compiled = jax.jit(cpu_kernels.banded_weight_gradient, static_argnums=(2, 3)).lower(x, g, 3, 1).compile()
  assert "all-gather" not in compiled.as_text()
  _assert_sums_close(compiled(x, g), _xla_weight_gradient(x, g, 1))


@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 9, 7, 2)])  # odd sizes: the last row or column is dropped
def test_max_pool_as_a_reshape_equals_nn_max_pool_bit_for_bit_ties_included(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ties = jnp.round(x)  # many windows with two or more equal maxima: the first in row-major order takes the gradient
  g = jax.random.normal(jax.random.PRNGKey(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
  for inputs in (x, ties):
    ours, our_vjp = jax.vjp(cpu_kernels.max_pool_2x2, inputs)
    theirs, their_vjp = jax.vjp(reference, inputs)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(our_vjp(g)[0], their_vjp(g)[0])
  assert float(jnp.sum(jax.vjp(cpu_kernels.max_pool_2x2, ties)[1](jnp.ones_like(g))[0])) == g.size  # one winner each


def test_the_paper_unet_is_the_same_model_with_unpadded_convolutions_as_cropped_padded_ones(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 188, 188, 1))
  results = []
  for min_channels in (10**9, 1):  # never, and from the first layer on
    monkeypatch.setattr(cpu_kernels, "VALID_AS_CROPPED_SAME_MIN_CHANNELS", min_channels)
    model = get_model("unet_valid", num_classes=2, depth=2, base_width=4, kernels="cpu")
    variables = model.init(jax.random.PRNGKey(2), x, train=False)
    loss = lambda p, model=model, variables=variables: jnp.sum(  # noqa: E731
      jnp.sin(model.apply({**variables, "params": p}, x, train=False))
    )
    results.append((variables, model.apply(variables, x, train=False), jax.grad(loss)(variables["params"])))
  jax.tree_util.tree_map(np.testing.assert_array_equal, results[0][0], results[1][0])
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), results[1][2], results[0][2]
  )


@pytest.mark.parametrize("shape", [(2, 48, 50, 5), (1, 7, 9, 3)])  # 4800 pixels: banded; 63: one matrix product
def test_pointwise_gradients_equal_the_plain_matrix_products(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (shape[-1], 6))
  g = jax.random.normal(jax.random.PRNGKey(2), (*shape[:3], 6))
  plain = lambda x, kernel: jax.lax.dot_general(x, kernel, (((3,), (0,)), ((), ())))  # noqa: E731
  ours, our_vjp = jax.vjp(cpu_kernels.pointwise, x, kernel)
  theirs, their_vjp = jax.vjp(plain, x, kernel)
  np.testing.assert_array_equal(ours, theirs)
  (dx, dw), (their_dx, their_dw) = our_vjp(g), their_vjp(g)
  np.testing.assert_array_equal(dx, their_dx)
  _assert_sums_close(dw, their_dw)


@pytest.mark.parametrize("shape", [(2, 12, 10, 3), (1, 9, 7, 2)])  # odd sizes: the last window reads padding
def test_resnet_max_pool_as_strided_taps_equals_nn_max_pool_ties_included(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ties = jnp.round(x)  # many windows with two or more equal maxima: the first in row-major order takes the gradient
  reference = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  g = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  for inputs in (x, ties):
    ours, our_vjp = jax.vjp(cpu_kernels.max_pool_3x3_stride_2, inputs)
    theirs, their_vjp = jax.vjp(reference, inputs)
    np.testing.assert_array_equal(ours, theirs)
    # the same pixels receive the same gradients: exactly for unit gradients (integer sums), and to float32 rounding
    # for others (a pixel in two or four overlapping windows adds their gradients in another order)
    np.testing.assert_array_equal(our_vjp(jnp.ones_like(g))[0], their_vjp(jnp.ones_like(g))[0])
    np.testing.assert_allclose(our_vjp(g)[0], their_vjp(g)[0], rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(our_vjp(jnp.ones_like(g))[0])) == g.size  # one winner per window
