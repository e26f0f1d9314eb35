"""Loss values against hand computations and independent NumPy implementations; options, ignore labels, gradients."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from segjax.errors import SegjaxError
from segjax.losses import (
  LOSSES,
  deep_supervision_loss,
  dice_cross_entropy,
  downsample_nearest,
  focal_loss,
  get_loss,
  sigmoid_cross_entropy,
  sigmoid_dice_loss,
  soft_dice_loss,
  softmax_cross_entropy,
)

SOFTMAX_LOSSES = ("softmax_cross_entropy", "soft_dice_loss", "dice_cross_entropy", "focal_loss")
SIGMOID_LOSSES = ("sigmoid_cross_entropy", "sigmoid_dice_loss")
SHAPES = [(2, 5, 6, 3), (7, 4), (1, 3, 3, 2)]  # (B, H, W, C) images and (B, C) per-image classification


# Independent NumPy references (float64).


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_pixel_weights(labels, weights, ignore_label):
  w = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64)
  if ignore_label is not None:
    w = np.where(labels == ignore_label, 0.0, w)
  return np.where(labels == ignore_label, 0, labels) if ignore_label is not None else labels, w


def np_cross_entropy(logits, labels, weights=None, class_weights=None, ignore_label=None):
  labels, w = np_pixel_weights(labels, weights, ignore_label)
  ce = -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
  if class_weights is not None:
    w = w * np.asarray(class_weights)[labels]
  return (w * ce).sum() / w.sum()


def np_soft_dice(logits, labels, weights=None, ignore_label=None, smooth=1.0, include_background=True):
  labels, w = np_pixel_weights(labels, weights, ignore_label)
  num_classes = logits.shape[-1]
  probs = np.exp(np_log_softmax(logits)).reshape(-1, num_classes)
  target = np.eye(num_classes)[labels.reshape(-1)]
  w = w.reshape(-1, 1)
  dice = [
    (2 * (w * probs * target)[:, c].sum() + smooth) / ((w * probs)[:, c].sum() + (w * target)[:, c].sum() + smooth)
    for c in range(num_classes)
  ]
  return 1 - np.mean(dice if include_background else dice[1:])


def np_focal(logits, labels, weights=None, gamma=2.0, alpha=None, ignore_label=None):
  labels, w = np_pixel_weights(labels, weights, ignore_label)
  log_pt = np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
  loss = -((1 - np.exp(log_pt)) ** gamma) * log_pt
  if alpha is not None:
    loss = loss * np.asarray(alpha)[labels]
  return (w * loss).sum() / w.sum()


def np_sigmoid_terms(logits, labels, weights, ignore_label):
  labels, w = np_pixel_weights(labels, weights, ignore_label)
  return np.asarray(logits, np.float64)[..., 0], labels.astype(np.float64), w


def np_sigmoid_cross_entropy(logits, labels, weights=None, ignore_label=None):
  x, t, w = np_sigmoid_terms(logits, labels, weights, ignore_label)
  bce = -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))
  return (w * bce).sum() / w.sum()


def np_sigmoid_dice(logits, labels, weights=None, ignore_label=None, smooth=1.0):
  x, t, w = np_sigmoid_terms(logits, labels, weights, ignore_label)
  p = 1 / (1 + np.exp(-x))
  return 1 - (2 * (w * p * t).sum() + smooth) / ((w * p).sum() + (w * t).sum() + smooth)


def random_case(shape, seed=0, absent_class=None, ignore_fraction=0.0, ignore_label=255):
  rng = np.random.default_rng(seed)
  num_classes = shape[-1]
  logits = rng.normal(0.0, 2.0, shape).astype(np.float32)
  classes = [c for c in range(num_classes) if c != absent_class]
  labels = rng.choice(classes, shape[:-1]).astype(np.int32)
  labels = np.where(rng.random(shape[:-1]) < ignore_fraction, ignore_label, labels).astype(np.int32)
  weights = rng.uniform(0.0, 2.0, shape[:-1]).astype(np.float32)
  return logits, labels, weights


def binary_case(shape, seed=0, absent_class=None, ignore_fraction=0.0):
  logits, labels, weights = random_case((*shape, 2), seed, absent_class, ignore_fraction)
  return logits[..., :1], labels, weights


# Cross-entropy.


def test_cross_entropy_matches_hand_computation():
  # Two pixels, 2 classes. Pixel 0: logits (0, 0) label 1 -> ln 2. Pixel 1: logits (ln 3, 0) label 0 -> ln(4/3).
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  labels = jnp.array([[1, 0]])
  expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
  np.testing.assert_allclose(softmax_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_weights_select_and_scale_pixels():
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  labels = jnp.array([[1, 0]])
  only_second = softmax_cross_entropy(logits, labels, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(only_second, math.log(4.0 / 3.0), rtol=1e-6)
  # w = (1, 3): (ln2 + 3 ln(4/3)) / 4, the U-Net paper's weighted energy normalised by the total weight.
  weighted = softmax_cross_entropy(logits, labels, jnp.array([[1.0, 3.0]]))
  np.testing.assert_allclose(weighted, (math.log(2.0) + 3 * math.log(4.0 / 3.0)) / 4, rtol=1e-6)


def test_cross_entropy_class_weights_hand_computed():
  # Same two pixels; class weights (1, 3) give pixel 0 (label 1) weight 3: (3 ln2 + ln(4/3)) / 4.
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  labels = jnp.array([[1, 0]])
  loss = softmax_cross_entropy(logits, labels, class_weights=(1.0, 3.0))
  np.testing.assert_allclose(loss, (3 * math.log(2.0) + math.log(4.0 / 3.0)) / 4, rtol=1e-6)
  # A constant class-weight vector cancels in the normalisation.
  np.testing.assert_allclose(
    softmax_cross_entropy(logits, labels, class_weights=(2.0, 2.0)), softmax_cross_entropy(logits, labels), rtol=1e-6
  )


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_numpy_with_all_options(shape):
  logits, labels, weights = random_case(shape, ignore_fraction=0.2)
  class_weights = np.linspace(0.5, 2.0, shape[-1])
  loss = softmax_cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), class_weights=class_weights, ignore_label=255
  )
  expected = np_cross_entropy(logits, labels, weights, class_weights, ignore_label=255)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


# Soft Dice, Dice + CE, focal.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("include_background", [True, False])
def test_soft_dice_matches_numpy(shape, include_background):
  logits, labels, weights = random_case(shape, seed=1, ignore_fraction=0.2)
  loss = soft_dice_loss(
    jnp.asarray(logits),
    jnp.asarray(labels),
    jnp.asarray(weights),
    ignore_label=255,
    smooth=0.5,
    include_background=include_background,
  )
  expected = np_soft_dice(logits, labels, weights, 255, smooth=0.5, include_background=include_background)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_soft_dice_equals_optax_batch_dice_without_weights():
  # optax's coefficient is (I + s) / (P/2 + T/2 + s), i.e. ours, (2I + s') / (P + T + s'), with s = s' / 2. Flattening
  # the batch into one "image" makes optax sum over the whole batch.
  logits, labels, _ = random_case((2, 4, 5, 3), seed=2)
  ours = soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels), smooth=1.0, include_background=False)
  onehot = jax.nn.one_hot(labels, 3).reshape(1, -1, 3)
  theirs = optax.losses.dice_loss(jnp.asarray(logits).reshape(1, -1, 3), onehot, smooth=0.5, ignore_background=True)
  np.testing.assert_allclose(ours, theirs[0], rtol=1e-5)


def test_soft_dice_absent_class_hand_computed():
  # Two pixels, both class 0, uniform logits over 2 classes: p = 0.5 everywhere, s = 1.
  # class 0: (2 * 1 + 1) / (1 + 2 + 1) = 3/4; class 1 (absent): (0 + 1) / (1 + 0 + 1) = 1/2, i.e. loss P/(P+s) = 1/2.
  logits = jnp.zeros((1, 2, 2))
  labels = jnp.zeros((1, 2), jnp.int32)
  np.testing.assert_allclose(soft_dice_loss(logits, labels), 1 - (3 / 4 + 1 / 2) / 2, rtol=1e-6)
  # A confident correct prediction: the absent class, nearly absent from predictions too, adds ~0 loss.
  confident = jnp.stack([jnp.full((1, 2), 30.0), jnp.zeros((1, 2))], -1)
  assert float(soft_dice_loss(confident, labels)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_cross_entropy_is_weighted_sum_of_terms(shape):
  logits, labels, weights = random_case(shape, seed=3, ignore_fraction=0.2)
  class_weights = np.linspace(1.0, 3.0, shape[-1])
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  loss = dice_cross_entropy(
    *args, ce_weight=0.3, dice_weight=2.0, class_weights=class_weights, ignore_label=255, include_background=False
  )
  expected = 0.3 * np_cross_entropy(logits, labels, weights, class_weights, 255) + 2.0 * np_soft_dice(
    logits, labels, weights, 255, include_background=False
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_focal_loss_hand_computed():
  # One pixel, logits (ln 3, 0), label 0: p_t = 3/4, FL = alpha_0 (1/4)**2 ln(4/3).
  logits = jnp.array([[math.log(3.0), 0.0]])
  labels = jnp.array([0])
  np.testing.assert_allclose(focal_loss(logits, labels), (1 / 16) * math.log(4 / 3), rtol=1e-5)
  np.testing.assert_allclose(focal_loss(logits, labels, alpha=(0.25, 0.75)), 0.25 / 16 * math.log(4 / 3), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_focal_loss_matches_numpy_and_reduces_to_cross_entropy(shape):
  logits, labels, weights = random_case(shape, seed=4, ignore_fraction=0.2)
  alpha = np.linspace(0.25, 1.0, shape[-1])
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(
    focal_loss(*args, gamma=1.5, alpha=alpha, ignore_label=255),
    np_focal(logits, labels, weights, 1.5, alpha, 255),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    focal_loss(*args, gamma=0.0, ignore_label=255), softmax_cross_entropy(*args, ignore_label=255), rtol=1e-6
  )


# Sigmoid (one-logit binary) losses.


@pytest.mark.parametrize("shape", [(2, 5, 6), (9,)])
def test_sigmoid_losses_match_numpy(shape):
  logits, labels, weights = binary_case(shape, seed=5, ignore_fraction=0.2)
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(
    sigmoid_cross_entropy(*args, ignore_label=255), np_sigmoid_cross_entropy(logits, labels, weights, 255), rtol=1e-5
  )
  np.testing.assert_allclose(
    sigmoid_dice_loss(*args, ignore_label=255, smooth=0.1),
    np_sigmoid_dice(logits, labels, weights, 255, smooth=0.1),
    rtol=1e-5,
  )


def test_sigmoid_losses_hand_computed():
  # Logits (0, ln 3) for labels (1, 0): p = (1/2, 3/4). BCE = (ln 2 + ln 4) / 2; Dice (s=1) = (2/2 + 1) / (5/4 + 1 + 1).
  logits = jnp.array([[0.0], [math.log(3.0)]])
  labels = jnp.array([1, 0])
  np.testing.assert_allclose(sigmoid_cross_entropy(logits, labels), (math.log(2) + math.log(4)) / 2, rtol=1e-6)
  np.testing.assert_allclose(sigmoid_dice_loss(logits, labels), 1 - 2 / 3.25, rtol=1e-6)


@pytest.mark.parametrize("name", SIGMOID_LOSSES)
def test_sigmoid_losses_refuse_multi_channel_logits(name):
  logits, labels, _ = random_case((2, 3, 3, 2))
  with pytest.raises(SegjaxError, match=f"loss '{name}' .* outputs 2 channels"):
    LOSSES[name](jnp.asarray(logits), jnp.asarray(labels))


# Properties shared by all losses.


def _case_for(name, shape=(2, 4, 5, 3), **kwargs):
  if name in SIGMOID_LOSSES:
    return binary_case(shape[:-1], **kwargs)
  return random_case(shape, **kwargs)


@pytest.mark.parametrize("name", SOFTMAX_LOSSES + SIGMOID_LOSSES)
def test_ignored_pixels_do_not_affect_the_loss(name):
  logits, labels, weights = _case_for(name, seed=6, ignore_fraction=0.3)
  ignored = labels == 255
  assert ignored.any()
  loss_fn = get_loss({"name": name, "ignore_label": 255})
  changed = np.where(ignored[..., None], np.random.default_rng(7).normal(0, 50, logits.shape), logits)
  before = loss_fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  after = loss_fn(jnp.asarray(changed.astype(np.float32)), jnp.asarray(labels), jnp.asarray(weights))
  chex.assert_tree_all_finite((before, after))
  np.testing.assert_allclose(before, after, rtol=1e-6)
  # Ignoring a label is the same as giving its pixels weight 0.
  zeroed = get_loss(name)(
    jnp.asarray(logits), jnp.asarray(np.where(ignored, 0, labels)), jnp.asarray(weights * ~ignored)
  )
  np.testing.assert_allclose(before, zeroed, rtol=1e-6)


@pytest.mark.parametrize("name", SOFTMAX_LOSSES + SIGMOID_LOSSES)
def test_gradient_finite_when_a_class_is_absent_and_loss_jits(name):
  logits, labels, weights = _case_for(name, seed=8, absent_class=1, ignore_fraction=0.2)
  if name in SIGMOID_LOSSES:
    labels = np.where(labels == 255, 255, 0).astype(np.int32)  # no foreground at all
  loss_fn = get_loss({"name": name, "ignore_label": 255})
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  value, grad = jax.jit(jax.value_and_grad(loss_fn))(*args)
  chex.assert_tree_all_finite((value, grad))
  chex.assert_shape(grad, logits.shape)
  assert float(jnp.abs(grad).sum()) > 0
  np.testing.assert_allclose(value, loss_fn(*args), rtol=1e-5)


def test_jitted_loss_compiles_once_for_one_shape():
  bound = get_loss({"name": "dice_cross_entropy", "ignore_label": 255})
  loss_fn = jax.jit(chex.assert_max_traces(lambda *args: bound(*args), n=1))
  for seed in range(3):
    logits, labels, weights = random_case((2, 4, 4, 3), seed=seed)
    loss_fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))


def test_losses_accept_bfloat16_logits():
  logits, labels, _ = random_case((2, 4, 4, 3), seed=9)
  for name in SOFTMAX_LOSSES:
    loss = LOSSES[name](jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


# get_loss: names, options, errors.


def test_get_loss_by_name_returns_the_registered_function():
  assert get_loss("softmax_cross_entropy") is softmax_cross_entropy
  assert set(SOFTMAX_LOSSES + SIGMOID_LOSSES) <= set(LOSSES)


@pytest.mark.parametrize("as_config_dict", [False, True])
def test_get_loss_binds_options_from_a_dict_or_config_dict(as_config_dict):
  spec = {"name": "dice_cross_entropy", "ignore_label": 255, "class_weights": [1.0, 3.0, 0.5], "dice_weight": 0.5}
  loss_fn = get_loss(ml_collections.ConfigDict(spec) if as_config_dict else spec)
  logits, labels, weights = random_case((2, 4, 4, 3), seed=10, ignore_fraction=0.2)
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  expected = dice_cross_entropy(*args, ignore_label=255, class_weights=(1.0, 3.0, 0.5), dice_weight=0.5)
  np.testing.assert_allclose(loss_fn(*args), expected, rtol=1e-6)
  np.testing.assert_allclose(get_loss({"name": "focal_loss"})(*args[:2]), focal_loss(*args[:2]), rtol=1e-6)


def test_unknown_loss_names_the_config_key():
  with pytest.raises(SegjaxError, match="unknown loss 'dice_typo' \\(config key loss\\)"):
    get_loss("dice_typo")
  with pytest.raises(SegjaxError, match="unknown loss 'dice_typo' \\(config key loss\\)"):
    get_loss({"name": "dice_typo"})


def test_unknown_option_names_loss_key_and_accepted_options():
  expected = r"loss 'focal_loss' has no option 'gama' \(config key loss.gama\); accepted options: gamma, alpha, ign"
  with pytest.raises(SegjaxError, match=expected):
    get_loss({"name": "focal_loss", "gama": 2.0})


def test_missing_loss_name_is_a_segjax_error():
  with pytest.raises(SegjaxError, match="config key loss.name"):
    get_loss({"ignore_label": 255})


def test_class_weights_of_wrong_length_name_the_config_key():
  loss_fn = get_loss({"name": "softmax_cross_entropy", "class_weights": [1.0, 2.0]})
  logits, labels, _ = random_case((2, 3, 3, 3))
  with pytest.raises(SegjaxError, match="config key loss.class_weights has 2 values but the model outputs 3 classes"):
    loss_fn(jnp.asarray(logits), jnp.asarray(labels))


# Deep supervision.


def test_downsample_nearest_matches_ceil_sizes_of_decoder_levels():
  x = jnp.arange(37 * 50).reshape(1, 37, 50)
  out = downsample_nearest(x, 10, 13)  # ceil(37/4), ceil(50/4)
  np.testing.assert_array_equal(out, x[:, ::4, ::4])
  with pytest.raises(ValueError, match="power-of-two"):
    downsample_nearest(x, 11, 13)


def test_deep_supervision_loss_weights_outputs_by_resolution():
  labels = jnp.zeros((1, 8, 8), jnp.int32)
  perfect = jnp.stack([jnp.full((8, 8), 20.0), jnp.zeros((8, 8))], -1)[None]
  wrong_coarse = jnp.stack([jnp.zeros((2, 2)), jnp.full((2, 2), math.log(3.0))], -1)[None]  # CE = ln 4
  mid = jnp.stack([jnp.full((4, 4), 20.0), jnp.zeros((4, 4))], -1)[None]
  loss = deep_supervision_loss(softmax_cross_entropy, perfect, (wrong_coarse, mid), labels)
  # weights 1, 1/2, 1/4 for resolutions 1, 1/2, 1/4; only the 1/4 output has loss ln 4 (others ~ 2e-9).
  np.testing.assert_allclose(loss, 0.25 * math.log(4.0) / 1.75, rtol=1e-5)


def test_deep_supervision_with_bound_options_and_ignore_label():
  loss_fn = get_loss({"name": "dice_cross_entropy", "ignore_label": 255})
  logits, labels, weights = random_case((2, 8, 8, 3), seed=11, ignore_fraction=0.2)
  aux = tuple(jnp.asarray(random_case((2, s, s, 3), seed=s)[0]) for s in (2, 4))
  loss = jax.jit(lambda *a: deep_supervision_loss(loss_fn, *a))(
    jnp.asarray(logits), aux, jnp.asarray(labels), jnp.asarray(weights)
  )
  expected = (
    sum(
      scale * np_cross_entropy(out, labels[:, ::k, ::k], weights[:, ::k, ::k], ignore_label=255)
      + scale * np_soft_dice(out, labels[:, ::k, ::k], weights[:, ::k, ::k], 255)
      for scale, out, k in ((1.0, logits, 1), (0.5, np.asarray(aux[1]), 2), (0.25, np.asarray(aux[0]), 4))
    )
    / 1.75
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
