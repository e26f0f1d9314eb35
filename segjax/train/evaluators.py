"""Per-image evaluators: metrics computed on the host from one predicted label map and its example.

Each evaluator is ``fn(prediction, info) -> {metric: value}`` with ``prediction`` the (H, W) predicted class ids of
one image (cropped to its size) and ``info`` the example's source features (``mask``, ``instances``). The loop
averages each metric over the images of a split. Configs name them in ``evaluators``, e.g. ``('isbi',)``.
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segjax.data.instance_targets import InstanceSettings
from segjax.errors import SegjaxError
from segjax.metrics import (
  ISBI_CHALLENGE_THRESHOLDS,
  instance_scores,
  is_isbi_count_key,
  isbi_errors_from_counts,
  isbi_slice_counts,
  label_instances,
)
from segjax.registry import Registry

Evaluator = Callable[[np.ndarray, dict[str, Any]], dict[str, float]]

ISBI_MEMBRANE = 1
"""The membrane class of the ``isbi2012`` data set."""


ISBI_THRESHOLDS = ISBI_CHALLENGE_THRESHOLDS
"""Cell-interior probability thresholds of the ISBI 2012 scores (0.0, 0.1, ..., 1.0, as the challenge)."""


def isbi_evaluator(prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """Per-threshold counts of the ISBI 2012 pixel error and foreground-restricted Rand error of one slice.

  The challenge binarised the cell-interior probability at thresholds t = 0.0, 0.1, ..., 1.0 (interior where
  ``interior probability > t``, i.e. membrane where ``membrane probability >= 1 - t``), formed each F-score from
  counts pooled over all slices and ranked by 1 - the best (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142;
  :func:`segjax.metrics.isbi_challenge_errors`). So this returns counts, not errors: ``pixel_tp/t<t>``,
  ``pixel_fp/t<t>``, ``pixel_fn/t<t>``, ``rand_tp/t<t>``, ``rand_fp/t<t>``, ``rand_fn/t<t>`` for each t of
  ``ISBI_THRESHOLDS`` (:func:`segjax.metrics.isbi_slice_counts`). The loop averages them over the slices of a split,
  and :func:`best_over_thresholds` turns the means into the errors (mean counts give the pooled F-scores).

  Args:
    prediction: (H, W) predicted class ids; class 1 is membrane. Scored as a 0/1 membrane probability when
      ``info`` has no ``foreground_probability``.
    info: the example's ``mask`` (H, W, 1) with class 1 = membrane, and optionally ``foreground_probability``: the
      model's (H, W) probability of class 1, the membrane.
  """
  membrane_label = np.asarray(info["mask"])[..., 0] == ISBI_MEMBRANE
  probability = info.get("foreground_probability")
  if probability is None:
    probability = (prediction == ISBI_MEMBRANE).astype(np.float32)
  return isbi_slice_counts(probability, membrane_label, thresholds=ISBI_THRESHOLDS)


def best_over_thresholds(metrics: dict[str, float]) -> dict[str, float]:
  """Replaces the ISBI counts of :func:`isbi_evaluator`, averaged over a split, with the challenge's errors.

  Adds ``pixel_error/t<t>`` and ``rand_error/t<t>`` (1 - the F-score of the mean counts, which equals the F of the
  counts summed over the split's slices) and the best over thresholds, ``pixel_error``, ``rand_error``,
  ``pixel_error_threshold`` and ``rand_error_threshold`` (thresholds on the cell-interior probability), via
  :func:`segjax.metrics.isbi_errors_from_counts`. The raw count keys are dropped to keep the summary readable;
  every other metric is returned unchanged.
  """
  counts = {k: v for k, v in metrics.items() if is_isbi_count_key(k)}
  out = {k: v for k, v in metrics.items() if k not in counts}
  if counts:
    out.update(isbi_errors_from_counts(counts))
  return out


def instance_evaluator(
  prediction: np.ndarray, info: dict[str, Any], *, instances: InstanceSettings | None = None
) -> dict[str, float]:
  """Instance scores of one image (:func:`segjax.metrics.instance_scores`): the Data Science Bowl 2018 average
  precision over IoU 0.5:0.05:0.95 (``instance_ap``), AJI (``aji``), panoptic quality (``pq``, ``sq``, ``rq``) and
  the object F1 at IoU 0.5 (``f1``), against the true instances.

  The predicted instances come from ``instances`` (``config.instances``): with ``method='watershed'`` the
  marker-controlled watershed of the predicted instance-target probabilities (``info['probabilities']``), reported
  under the plain names, and the connected components of the predicted foreground (every class but 0) of the same
  prediction under ``<name>/components``, so both methods are scored on one checkpoint; with
  ``method='components'`` only the connected components, under the plain names.
  """
  if "instances" not in info:
    raise SegjaxError("evaluator 'instances' needs a dataset with instance maps; remove it from config evaluators.")
  settings = instances or InstanceSettings()
  truth = np.asarray(info["instances"])[..., 0]
  components = instance_scores(label_instances(prediction > 0, min_size=settings.min_size), truth)
  if settings.method == "components" or "probabilities" not in info:
    return components
  scores = instance_scores(settings.to_instances(np.asarray(info["probabilities"])), truth)
  return {**scores, **{f"{k}/components": v for k, v in components.items()}}


EVALUATORS: Registry[Evaluator] = Registry("evaluator", "evaluators")
"""The evaluators by name. Metadata ``reads``: the source features an evaluator needs besides the prediction (default
``('mask',)``); those reading ``instances`` need a data set with instance maps."""
EVALUATORS.register("isbi", isbi_evaluator, reads=("mask",))
EVALUATORS.register("instances", instance_evaluator, reads=("mask", "instances"))


def _reads(name: str) -> tuple[str, ...]:
  return tuple(EVALUATORS.metadata(name).get("reads", ("mask",)))


def evaluator_keys(names: Sequence[str]) -> tuple[str, ...]:
  """The source features the named evaluators read (kept on the host during evaluation)."""
  keys = [key for name in names for key in _reads(name)]
  return tuple(dict.fromkeys(keys)) if keys else ()


def check_evaluators(names: Sequence[str], has_instances: bool) -> None:
  """SegjaxError before training when an evaluator needs instance maps the dataset does not have."""
  get_evaluators(names)
  if not has_instances and (needing := [n for n in names if "instances" in _reads(n)]):
    raise SegjaxError(
      f"evaluator '{needing[0]}' needs a dataset with instance maps, which this dataset has not; remove it from "
      "config evaluators."
    )


def get_evaluators(names: Sequence[str], *, instances: InstanceSettings | None = None) -> tuple[Evaluator, ...]:
  """The evaluators named in the config; those taking an ``instances`` keyword get ``config.instances`` bound.

  Raises:
    SegjaxError: for an unknown name.
  """
  fns = [EVALUATORS.lookup(name) for name in names]
  return tuple(
    functools.partial(fn, instances=instances) if "instances" in inspect.signature(fn).parameters else fn for fn in fns
  )


def run_evaluators(evaluators: Sequence[Evaluator], prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """All evaluators' metrics of one image in one dict."""
  metrics: dict[str, float] = {}
  for evaluator in evaluators:
    metrics.update(evaluator(prediction, info))
  return metrics
