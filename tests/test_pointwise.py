"""1x1 convolutions as matrix products (the CPU formulation) compute exactly what nn.Conv computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import get_model, layers


@pytest.mark.parametrize("strides,size,use_bias", [(1, 9, True), (2, 9, False), (2, 8, True)])
def test_pointwise_conv_equals_nn_conv_with_the_same_parameters_and_gradients(strides, size, use_bias):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
  reference = nn.Conv(7, (1, 1), strides=(strides, strides), padding="VALID", use_bias=use_bias)
  pointwise = layers.PointwiseConv(7, strides=strides, use_bias=use_bias)
  params = reference.init(jax.random.PRNGKey(1), x)
  chex_tree = jax.tree_util.tree_map(np.shape, pointwise.init(jax.random.PRNGKey(1), x))
  assert chex_tree == jax.tree_util.tree_map(np.shape, params)
  np.testing.assert_array_equal(
    jax.tree_util.tree_leaves(pointwise.init(jax.random.PRNGKey(1), x))[-1], jax.tree_util.tree_leaves(params)[-1]
  )  # same initial kernel
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
  np.testing.assert_allclose(pointwise.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
  for ours, theirs in zip(
    jax.grad(loss(pointwise), argnums=(0, 1))(params, x),
    jax.grad(loss(reference), argnums=(0, 1))(params, x),
    strict=True,
  ):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, theirs)


def test_resnet_is_the_same_model_with_either_formulation(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 40, 3))
  outputs, trees = [], []
  for as_matmul in (False, True):
    monkeypatch.setattr(layers, "POINTWISE_AS_MATMUL", as_matmul)
    model = get_model("resnet50", num_classes=4, width=8)
    variables = model.init(jax.random.PRNGKey(2), x, train=False)
    trees.append(variables)
    outputs.append(model.apply(variables, x, train=False))
  jax.tree_util.tree_map(np.testing.assert_array_equal, trees[0], trees[1])  # same names, shapes and initial values
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


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


def test_up_convolution_equals_the_transposed_convolution_with_the_same_parameters_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  _assert_same_layer(layers.UpConv2x2(4), reference, x, grad_atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "unet_valid", "resnet18_unet"])
def test_unets_are_the_same_model_with_either_formulation(monkeypatch, name):
  x = jax.random.normal(
    jax.random.PRNGKey(0), (1, 188 if name == "unet_valid" else 64, 188 if name == "unet_valid" else 64, 3)
  )
  kwargs = {"depth": 4, "base_width": 4} if name != "resnet18_unet" else {}
  outputs, trees = [], []
  for as_matmul in (False, True):
    monkeypatch.setattr(layers, "POINTWISE_AS_MATMUL", as_matmul)
    model = get_model(name, num_classes=3, **kwargs)
    variables = model.init(jax.random.PRNGKey(2), x, train=False)
    trees.append(variables)
    outputs.append(model.apply(variables, x, train=False))
  jax.tree_util.tree_map(np.testing.assert_array_equal, trees[0], trees[1])
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def _assert_sums_close(ours, theirs):
  """Sums of thousands of products, added in another order: equal to float32 rounding of the largest entries."""
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(np.abs(theirs).max()))


def _xla_weight_gradient(x, g, pad):
  return jax.vjp(lambda w: layers._conv3x3(x, w, pad), jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype))[1](g)[0]


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
  ours = jax.jit(layers.banded_weight_gradient, static_argnums=(2, 3))(x, g, 3, pad)
  assert ours.shape == (3, 3, shape[-1], 6) and ours.dtype == x.dtype
  _assert_sums_close(ours, _xla_weight_gradient(x, g, pad))


def test_the_blocked_weight_gradient_of_bfloat16_inputs_accumulates_in_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 96, 8)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 96, 4)).astype(jnp.bfloat16)
  ours = layers.banded_weight_gradient(x, g, 3, 1)
  exact = _xla_weight_gradient(x.astype(jnp.float32), g.astype(jnp.float32), 1)
  assert ours.dtype == jnp.bfloat16
  # rounding the float32 sum of 3072 products once to bfloat16: within bfloat16's half-ulp of the exact sum
  np.testing.assert_allclose(np.asarray(ours, np.float32), exact, rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 1), (1, 1)), ((0, 0), (0, 0))])
@pytest.mark.parametrize("use_bias,channels", [(True, 5), (False, 5), (True, 16)])  # 16: VALID as cropped SAME
def test_conv3x3_equals_nn_conv_with_the_same_parameters_and_gradients(padding, use_bias, channels):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 67, channels))  # 65 or 67 wide: the blocked gradient is used
  reference = nn.Conv(7, (3, 3), padding=padding, use_bias=use_bias)
  _assert_same_layer(layers.Conv3x3(7, padding=padding, use_bias=use_bias), reference, x, grad_atol=1e-4)


def test_conv3x3_refuses_a_padding_it_does_not_compute():
  from segjax.errors import SegjaxError

  with pytest.raises(SegjaxError, match="padding 'SAME' or 'VALID'"):
    layers.Conv3x3(4, padding=((2, 2), (2, 2))).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def test_the_blocked_weight_gradient_keeps_a_sharded_batch_sharded():
  """Bands cut rows, not images: on 4 devices each sums its own images and only the (3, 3, C, O) result is reduced."""
  from segjax.train import parallel

  batch = parallel.batch_sharded(parallel.create_mesh())
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 12, 64, 4)), batch)
  g = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (8, 12, 64, 6)), batch)
  compiled = jax.jit(layers.banded_weight_gradient, static_argnums=(2, 3)).lower(x, g, 3, 1).compile()
  assert "all-gather" not in compiled.as_text()
  _assert_sums_close(compiled(x, g), _xla_weight_gradient(x, g, 1))


@pytest.mark.parametrize("name", ["unet", "unet_valid"])
def test_unets_are_the_same_model_with_either_weight_gradient(monkeypatch, name):
  size = 188 if name == "unet_valid" else 64  # the first level is at least 64 wide: the blocked gradient is used
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 1))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, size, size), 0, 3)
  results = []
  for blocked in (False, True):
    monkeypatch.setattr(layers, "CONV3X3_BLOCKED_WEIGHT_GRADIENT", blocked)
    model = get_model(name, num_classes=3, depth=2, base_width=4)
    variables = model.init(jax.random.PRNGKey(2), x, train=False)

    def loss(params, model=model, variables=variables):
      logits = model.apply({**variables, "params": params}, x, train=False)
      crop = (labels.shape[1] - logits.shape[1]) // 2
      target = labels[:, crop : crop + logits.shape[1], crop : crop + logits.shape[2]]
      return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1)), logits

    results.append((variables, *jax.grad(loss, has_aux=True)(variables["params"])))
  (variables, grads, logits), (variables_b, grads_b, logits_b) = results
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables_b)  # same names, shapes and values
  np.testing.assert_array_equal(logits_b, logits)  # the forward pass is XLA's convolution either way
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), grads_b, grads)


@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 9, 7, 2)])  # odd sizes: the last row or column is dropped
def test_max_pool_as_a_reshape_equals_nn_max_pool_bit_for_bit_ties_included(monkeypatch, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ties = jnp.round(x)  # many windows with two or more equal maxima: the first in row-major order takes the gradient
  g = jax.random.normal(jax.random.PRNGKey(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
  monkeypatch.setattr(layers, "MAX_POOL_AS_RESHAPE", True)
  for inputs in (x, ties):
    ours, our_vjp = jax.vjp(layers.max_pool_2x2, inputs)
    theirs, their_vjp = jax.vjp(reference, inputs)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(our_vjp(g)[0], their_vjp(g)[0])
  assert float(jnp.sum(jax.vjp(layers.max_pool_2x2, ties)[1](jnp.ones_like(g))[0])) == g.size  # one winner each


@pytest.mark.parametrize("name", ["unet", "unet_valid"])
def test_unets_train_bit_for_bit_the_same_with_either_max_pool(monkeypatch, name):
  size = 188 if name == "unet_valid" else 32
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 1))
  grads = []
  for as_reshape in (False, True):
    monkeypatch.setattr(layers, "MAX_POOL_AS_RESHAPE", as_reshape)
    model = get_model(name, num_classes=2, depth=2, base_width=4)
    variables = model.init(jax.random.PRNGKey(2), x, train=False)
    loss = lambda p, model=model, variables=variables: jnp.sum(  # noqa: E731
      jnp.sin(model.apply({**variables, "params": p}, x, train=False))
    )
    grads.append(jax.grad(loss)(variables["params"]))
  jax.tree_util.tree_map(np.testing.assert_array_equal, grads[0], grads[1])


def test_the_paper_unet_is_the_same_model_with_unpadded_convolutions_as_cropped_padded_ones(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 188, 188, 1))
  results = []
  for min_channels in (10**9, 1):  # never, and from the first layer on
    monkeypatch.setattr(layers, "VALID_AS_CROPPED_SAME_MIN_CHANNELS", min_channels)
    model = get_model("unet_valid", num_classes=2, depth=2, base_width=4)
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
  ours, our_vjp = jax.vjp(layers.pointwise, x, kernel)
  theirs, their_vjp = jax.vjp(plain, x, kernel)
  np.testing.assert_array_equal(ours, theirs)
  (dx, dw), (their_dx, their_dw) = our_vjp(g), their_vjp(g)
  np.testing.assert_array_equal(dx, their_dx)
  _assert_sums_close(dw, their_dw)


@pytest.mark.parametrize("shape", [(2, 12, 10, 3), (1, 9, 7, 2)])  # odd sizes: the last window reads padding
def test_resnet_max_pool_as_strided_taps_equals_nn_max_pool_ties_included(monkeypatch, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ties = jnp.round(x)  # many windows with two or more equal maxima: the first in row-major order takes the gradient
  reference = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  g = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  monkeypatch.setattr(layers, "MAX_POOL_AS_RESHAPE", True)
  for inputs in (x, ties):
    ours, our_vjp = jax.vjp(layers.max_pool_3x3_stride_2, inputs)
    theirs, their_vjp = jax.vjp(reference, inputs)
    np.testing.assert_array_equal(ours, theirs)
    # the same pixels receive the same gradients: exactly for unit gradients (integer sums), and to float32 rounding
    # for others (a pixel in two or four overlapping windows adds their gradients in another order)
    np.testing.assert_array_equal(our_vjp(jnp.ones_like(g))[0], their_vjp(jnp.ones_like(g))[0])
    np.testing.assert_allclose(our_vjp(g)[0], their_vjp(g)[0], rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(our_vjp(jnp.ones_like(g))[0])) == g.size  # one winner per window


def test_resnet_is_the_same_model_with_either_max_pool(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 36, 36, 3))
  results = []
  for as_taps in (False, True):
    monkeypatch.setattr(layers, "MAX_POOL_AS_RESHAPE", as_taps)
    model = get_model("resnet18", num_classes=3, width=8)
    variables = model.init(jax.random.PRNGKey(2), x, train=False)
    loss = lambda p, model=model, variables=variables: jnp.sum(  # noqa: E731
      jnp.sin(model.apply({**variables, "params": p}, x, train=False))
    )
    results.append((variables, model.apply(variables, x, train=False), jax.grad(loss)(variables["params"])))
  jax.tree_util.tree_map(np.testing.assert_array_equal, results[0][0], results[1][0])
  np.testing.assert_array_equal(results[1][1], results[0][1])
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)  # noqa: E731
  jax.tree_util.tree_map(close, results[1][2], results[0][2])
