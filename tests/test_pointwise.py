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


def test_up_convolution_equals_the_transposed_convolution_with_the_same_parameters_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  ours = layers.UpConv2x2(4)
  params = reference.init(jax.random.PRNGKey(1), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours.init(jax.random.PRNGKey(1), x), params)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
  for a, b in zip(
    jax.grad(loss(ours), argnums=(0, 1))(params, x), jax.grad(loss(reference), argnums=(0, 1))(params, x), strict=True
  ):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), a, b)


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
