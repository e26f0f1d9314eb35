"""Segmentation losses: pure functions of (logits, labels, weights) -> scalar.

Every loss has the signature ``loss(logits, labels, weights=None, **options) -> scalar``:

* ``logits`` have the class axis last, (..., C); the sigmoid losses take one channel, (..., 1);
* ``labels`` are integer class ids of shape ``logits.shape[:-1]``, so the same functions serve per-pixel segmentation
  (B, H, W, C) and per-image classification (B, C);
* ``weights`` are optional per-pixel floats of the labels' shape; 0 excludes a pixel (padding, ignored regions).

Options are keyword-only. ``ignore_label`` (e.g. 255) gives pixels with that label weight 0; such labels are replaced by
0 before any indexing, so they never produce NaN or out-of-range gathers. Losses are looked up through ``LOSSES`` /
``get_loss``, which binds the options of a config such as ``{'name': 'dice_cross_entropy', 'ignore_label': 255}``.
"""

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax.errors import SegjaxError
from segjax.registry import Registry

LossFn = Callable[..., jax.Array]

_EPS = 1e-8


def _check_shapes(logits: jax.Array, labels: jax.Array, weights: jax.Array | None) -> None:
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must be the logits shape {logits.shape} without the class axis.")
  if weights is not None and weights.shape != labels.shape:
    raise ValueError(f"weights shape {weights.shape} must equal the labels shape {labels.shape}.")


def _pixel_weights(
  labels: jax.Array, weights: jax.Array | None, ignore_label: int | None
) -> tuple[jax.Array, jax.Array]:
  """Returns ``(labels, w)``: float32 pixel weights with ignored pixels at 0, and labels with ignored ones set to 0."""
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  if ignore_label is not None:
    ignored = labels == ignore_label
    w = jnp.where(ignored, 0.0, w)
    labels = jnp.where(ignored, 0, labels)  # any in-range id: its loss is multiplied by 0
  return labels, w


def _per_class(values: Sequence[float] | jax.Array, num_classes: int, key: str) -> jax.Array:
  """A length-C float32 vector from a config value; SegjaxError naming ``loss.<key>`` if its length is not C."""
  values = jnp.asarray(values, jnp.float32)
  if values.shape != (num_classes,):
    raise SegjaxError(
      f"config key loss.{key} has {values.size} values but the model outputs {num_classes} classes; "
      f"give one value per class."
    )
  return values


def _weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), _EPS)


def _check_one_channel(logits: jax.Array, name: str) -> None:
  if logits.shape[-1] != 1:
    raise SegjaxError(
      f"loss '{name}' (config key loss) is for one-logit binary segmentation but the model outputs "
      f"{logits.shape[-1]} channels; use num_classes=1 or a softmax loss such as softmax_cross_entropy."
    )


def softmax_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  class_weights: Sequence[float] | None = None,
  ignore_label: int | None = None,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Weighted mean of the per-pixel softmax cross-entropy.

  This is the energy function of the U-Net paper (Ronneberger et al. 2015, Sec. 3, Eq. 1): a pixel-wise soft-max over
  the final feature map combined with the cross-entropy loss, each pixel weighted by ``w(x)``.

  The weight of a pixel is ``w = weights * class_weights[label]`` (0 for ``ignore_label``) and the loss is
  ``sum(w * ce) / max(sum(w), eps)``, i.e. class weights are normalised like PyTorch's ``CrossEntropyLoss(weight=)``:
  a constant class weight vector leaves the loss unchanged.

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights of the labels' shape (0 excludes a pixel, e.g. padding).
    class_weights: optional C floats; each pixel's weight is multiplied by the weight of its true class.
    ignore_label: optional label id (e.g. 255) whose pixels get weight 0.
    label_smoothing: epsilon of label smoothing (Szegedy et al. 2016, Sec. 7): the target is ``1 - epsilon`` on the
      true class plus ``epsilon / C`` on every class (``optax.smooth_labels``); 0 is the plain cross-entropy.

  Returns:
    The scalar weighted mean.
  """
  _check_shapes(logits, labels, weights)
  labels, w = _pixel_weights(labels, weights, ignore_label)
  if class_weights is not None:
    w = w * _per_class(class_weights, logits.shape[-1], "class_weights")[labels]
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return _weighted_mean(ce, w)


def _soft_dice(intersection: jax.Array, predicted: jax.Array, target: jax.Array, smooth: float) -> jax.Array:
  """Smoothed soft Dice ``(2 I + s) / (P + T + s)``: nnU-Net's form (V-Net's Eq. 1 squares the terms of P and T)."""
  return (2.0 * intersection + smooth) / (predicted + target + smooth)


def soft_dice_loss(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  ignore_label: int | None = None,
  smooth: float = 1.0,
  include_background: bool = True,
) -> jax.Array:
  """Multi-class soft Dice loss on softmax probabilities, summed over the whole batch (batch Dice).

  For each class c, with softmax probabilities ``p``, one-hot labels ``t`` and pixel weights ``w`` summed over every
  pixel of every image in the batch (batch Dice, as nnU-Net; Isensee et al. 2021):
  ``I_c = sum(w p_c t_c)``, ``P_c = sum(w p_c)``, ``T_c = sum(w t_c)``, ``dice_c = (2 I_c + s) / (P_c + T_c + s)``,
  and the loss is ``1 - mean_c dice_c`` (soft Dice of Milletari et al. 2016, Eq. 1, without squares in the
  denominator and with additive smoothing ``s``, as in nnU-Net).

  A class absent from a batch (``T_c = 0``) contributes ``1 - dice_c = P_c / (P_c + s)``: it is finite, falls to 0 as
  its predicted mass ``P_c`` falls to 0 (a class absent from both labels and predictions adds 0 loss), and penalises
  false positives. ``optax.losses.dice_loss`` is not used because it takes no per-pixel weights (so padding and
  ignored pixels could not be left out) and its smoothing is ``(2I + 2s) / (P + T + 2s)``.

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights; they multiply into all three sums.
    ignore_label: optional label id whose pixels get weight 0.
    smooth: additive smoothing ``s`` (> 0 keeps every class well defined).
    include_background: if False, class 0 is left out of the mean over classes.

  Returns:
    The scalar loss in [0, 1].
  """
  _check_shapes(logits, labels, weights)
  num_classes = logits.shape[-1]
  labels, w = _pixel_weights(labels, weights, ignore_label)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  w = w[..., None]
  axes = tuple(range(probs.ndim - 1))
  dice = _soft_dice(
    jnp.sum(w * probs * target, axis=axes), jnp.sum(w * probs, axis=axes), jnp.sum(w * target, axis=axes), smooth
  )
  if not include_background:
    if num_classes < 2:
      raise SegjaxError("config key loss.include_background=False needs at least 2 classes; set it to True.")
    dice = dice[1:]
  return 1.0 - jnp.mean(dice)


def dice_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  ce_weight: float = 1.0,
  dice_weight: float = 1.0,
  class_weights: Sequence[float] | None = None,
  ignore_label: int | None = None,
  smooth: float = 1.0,
  include_background: bool = True,
) -> jax.Array:
  """``ce_weight * CE + dice_weight * soft Dice``, the default nnU-Net loss (Isensee et al. 2021).

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights, used by both terms.
    ce_weight: factor of :func:`softmax_cross_entropy`.
    dice_weight: factor of :func:`soft_dice_loss`.
    class_weights: per-class weights of the cross-entropy term only (Dice already averages over classes).
    ignore_label: optional label id left out of both terms.
    smooth: Dice smoothing.
    include_background: whether class 0 enters the Dice mean.

  Returns:
    The scalar loss.
  """
  ce = softmax_cross_entropy(logits, labels, weights, class_weights=class_weights, ignore_label=ignore_label)
  dice = soft_dice_loss(
    logits, labels, weights, ignore_label=ignore_label, smooth=smooth, include_background=include_background
  )
  return ce_weight * ce + dice_weight * dice


def focal_loss(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  gamma: float = 2.0,
  alpha: Sequence[float] | None = None,
  ignore_label: int | None = None,
) -> jax.Array:
  """Softmax focal loss ``FL(p_t) = -alpha_t (1 - p_t)**gamma log(p_t)`` (Lin et al. 2017, Sec. 3.2, Eq. 5).

  ``p_t`` is the softmax probability of the true class. The per-pixel losses are averaged with the pixel weights,
  ``sum(w * FL) / max(sum(w), eps)``; as in the paper (normalised by the number of assigned anchors), ``alpha`` is a
  weighting factor and is not part of the normaliser. With ``gamma=0`` and no ``alpha`` this is the cross-entropy.

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights.
    gamma: focusing parameter (>= 0); larger values down-weight well-classified pixels more.
    alpha: optional C per-class weights ``alpha_t``.
    ignore_label: optional label id whose pixels get weight 0.

  Returns:
    The scalar loss.
  """
  _check_shapes(logits, labels, weights)
  labels, w = _pixel_weights(labels, weights, ignore_label)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)  # -log p_t
  # 1 - p_t without cancellation near p_t = 1, kept off 0 so that (1 - p_t)**gamma has a finite gradient for gamma < 1.
  one_minus_pt = jnp.maximum(-jnp.expm1(-ce), 1e-12)
  loss = one_minus_pt**gamma * ce
  if alpha is not None:
    loss = loss * _per_class(alpha, logits.shape[-1], "alpha")[labels]
  return _weighted_mean(loss, w)


def _binary_targets(
  logits: jax.Array, labels: jax.Array, weights: jax.Array | None, ignore_label: int | None, name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits (...), float targets in {0, 1}, pixel weights) for the one-logit losses."""
  _check_shapes(logits, labels, weights)
  _check_one_channel(logits, name)
  labels, w = _pixel_weights(labels, weights, ignore_label)
  return logits[..., 0].astype(jnp.float32), labels.astype(jnp.float32), w


def sigmoid_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  ignore_label: int | None = None,
) -> jax.Array:
  """Weighted mean of the binary cross-entropy of one foreground logit per pixel (optax.sigmoid_binary_cross_entropy).

  Args:
    logits: float array (..., 1), the foreground logit.
    labels: class ids in {0, 1} (or ``ignore_label``), shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights.
    ignore_label: optional label id whose pixels get weight 0.

  Returns:
    The scalar ``sum(w * bce) / max(sum(w), eps)``.
  """
  logits, targets, w = _binary_targets(logits, labels, weights, ignore_label, "sigmoid_cross_entropy")
  return _weighted_mean(optax.sigmoid_binary_cross_entropy(logits, targets), w)


def sigmoid_dice_loss(
  logits: jax.Array,
  labels: jax.Array,
  weights: jax.Array | None = None,
  *,
  ignore_label: int | None = None,
  smooth: float = 1.0,
) -> jax.Array:
  """Binary soft Dice loss of one foreground logit, summed over the whole batch.

  ``1 - (2 sum(w p t) + s) / (sum(w p) + sum(w t) + s)`` with ``p = sigmoid(logit)`` and ``t`` the foreground label
  (as :func:`soft_dice_loss`). A batch without foreground gives ``P / (P + s)``, which vanishes as ``P -> 0``.

  Args:
    logits: float array (..., 1), the foreground logit.
    labels: class ids in {0, 1} (or ``ignore_label``), shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights; they multiply into the sums.
    ignore_label: optional label id whose pixels get weight 0.
    smooth: additive smoothing ``s``.

  Returns:
    The scalar loss in [0, 1].
  """
  logits, targets, w = _binary_targets(logits, labels, weights, ignore_label, "sigmoid_dice_loss")
  probs = jax.nn.sigmoid(logits)
  dice = _soft_dice(jnp.sum(w * probs * targets), jnp.sum(w * probs), jnp.sum(w * targets), smooth)
  return 1.0 - dice


def downsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Every s-th pixel of a (B, H, W) map with s = 2**k chosen so the result is (B, height, width), height = ceil(H/s).

  This matches a U-Net decoder level k of an input padded to a multiple of 2**k and cropped to ceil(H / 2**k).
  """
  stride_h = 2 ** round(math.log2(x.shape[1] / height))
  stride_w = 2 ** round(math.log2(x.shape[2] / width))
  out = x[:, ::stride_h, ::stride_w]
  if out.shape[1:3] != (height, width):
    raise ValueError(f"cannot downsample {x.shape[1:3]} to {(height, width)} by a power-of-two stride.")
  return out


def deep_supervision_loss(
  loss_fn: LossFn,
  logits: jax.Array,
  aux_logits: tuple[jax.Array, ...],
  labels: jax.Array,
  weights: jax.Array | None = None,
) -> jax.Array:
  """Loss over the full-resolution output and the coarser auxiliary outputs of a deeply supervised U-Net.

  Each auxiliary output (ordered coarsest to finest) is compared with the labels (and weights) subsampled to its
  resolution; the output at resolution 1/2**k gets weight 1/2**k and the weights are normalised to sum to 1, as in
  nnU-Net (Isensee et al. 2021, deep supervision). Subsampling keeps label ids as they are, so an ``ignore_label`` bound
  into ``loss_fn`` applies at every resolution.

  Args:
    loss_fn: the per-output loss ``(logits, labels, weights) -> scalar``, e.g. from :func:`get_loss`.
    logits: full-resolution logits (B, H, W, C).
    aux_logits: lower-resolution logits, coarsest first.
    labels: (B, H, W) class ids.
    weights: optional (B, H, W) pixel weights.
  """
  outputs = [logits, *reversed(aux_logits)]  # finest first: output i is at 1/2**i
  scales = [0.5**i for i in range(len(outputs))]
  total = 0.0
  for scale, out in zip(scales, outputs, strict=True):
    h, w = out.shape[1:3]
    w_map = None if weights is None else downsample_nearest(weights, h, w)
    total = total + scale * loss_fn(out, downsample_nearest(labels, h, w), w_map)
  return total / sum(scales)


LOSSES: Registry[LossFn] = Registry("loss", "loss")
"""The losses by name. Metadata ``one_logit=True`` marks the losses of binary models with one foreground logit per
pixel (instead of one logit per class), which :func:`model_outputs` reads."""
LOSSES.register("softmax_cross_entropy", softmax_cross_entropy)
LOSSES.register("soft_dice_loss", soft_dice_loss)
LOSSES.register("dice_cross_entropy", dice_cross_entropy)
LOSSES.register("focal_loss", focal_loss)
LOSSES.register("sigmoid_cross_entropy", sigmoid_cross_entropy, one_logit=True)
LOSSES.register("sigmoid_dice_loss", sigmoid_dice_loss, one_logit=True)


def loss_name(spec: str | Mapping[str, Any] | ml_collections.ConfigDict) -> str:
  """The loss name of a config value (a name, or a dict with ``name``)."""
  return spec if isinstance(spec, str) else str(spec.get("name"))


def model_outputs(spec: str | Mapping[str, Any] | ml_collections.ConfigDict, num_classes: int) -> int:
  """Logits per pixel the model needs for a loss: 1 for the sigmoid losses (2-class data only), else ``num_classes``.

  Raises:
    SegjaxError: for a one-logit loss on data with more than two classes.
  """
  if loss_name(spec) not in LOSSES or not LOSSES.metadata(loss_name(spec)).get("one_logit", False):
    return num_classes
  if num_classes != 2:
    raise SegjaxError(
      f"loss '{loss_name(spec)}' (config key loss) is binary, but the data has {num_classes} classes; use "
      "softmax_cross_entropy, soft_dice_loss, dice_cross_entropy or focal_loss."
    )
  return 1


def loss_options(fn: LossFn) -> tuple[str, ...]:
  """The keyword-only option names of a registered loss (everything after ``logits, labels, weights``)."""
  return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def get_loss(spec: str | Mapping[str, Any] | ml_collections.ConfigDict) -> LossFn:
  """Returns the loss named by a config value, with its options bound.

  Args:
    spec: a registered name (``'softmax_cross_entropy'``) or a dict / ``ConfigDict`` with key ``name`` and keyword
      options of that loss, e.g. ``{'name': 'dice_cross_entropy', 'ignore_label': 255, 'class_weights': [1.0, 3.0]}``.

  Returns:
    ``loss(logits, labels, weights=None) -> scalar``: the registered function itself when there are no options, else a
    ``functools.partial`` binding them.

  Raises:
    SegjaxError: naming the config key, for an unknown loss name, a missing ``name`` or an option the loss lacks.
  """
  if isinstance(spec, ml_collections.ConfigDict):
    spec = spec.to_dict()
  if isinstance(spec, str):
    name, options = spec, {}
  elif isinstance(spec, Mapping):
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str):
      raise SegjaxError(f"config key loss.name must name a loss, got {name!r}; available: {', '.join(LOSSES.names())}.")
  else:
    raise SegjaxError(f"config key loss must be a loss name or a dict with key 'name', got {spec!r}.")
  fn = LOSSES.lookup(name)
  accepted = loss_options(fn)
  for key in options:
    if key not in accepted:
      raise SegjaxError(
        f"loss '{name}' has no option '{key}' (config key loss.{key}); accepted options: {', '.join(accepted)}."
      )
  for key in ("class_weights", "alpha"):  # lists from a config: freeze so the bound loss is hashable and immutable
    if isinstance(options.get(key), list):
      options[key] = tuple(options[key])
  return functools.partial(fn, **options) if options else fn
