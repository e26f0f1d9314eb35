"""Per-image evaluators: metrics computed on the host from one predicted label map and its example.

Each evaluator is ``fn(prediction, info) -> {metric: value}`` with ``prediction`` the (H, W) predicted class ids of
one image (cropped to its size) and ``info`` the example's source features (``mask``, ``instances``). The loop
averages each metric over the images of a split. Configs name them in ``evaluators``, e.g. ``('isbi',)``.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segjax.errors import SegjaxError
from segjax.metrics import instance_average_precision, isbi_scores, label_instances

Evaluator = Callable[[np.ndarray, dict[str, Any]], dict[str, float]]

ISBI_MEMBRANE = 1
"""The membrane class of the ``isbi2012`` data set."""

MIN_INSTANCE_PIXELS = 10
"""Predicted connected components smaller than this are dropped before instance matching (noise, not nuclei)."""


ISBI_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))
"""Membrane-probability thresholds of the ISBI 2012 scores; the challenge reported the best over thresholds."""


def isbi_evaluator(prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """ISBI 2012 pixel error and foreground-restricted Rand error (1 - V_rand) of one slice; class 1 is membrane.

  The challenge scored each submitted membrane probability map at several thresholds and reported the best score
  (Arganda-Carreras et al. 2015; the challenge's evaluation page: "1 - the maximal F-score of the foreground-restricted
  Rand index"). With the model's membrane probability in ``info['foreground_probability']`` this returns the scores
  at each threshold t of ``ISBI_THRESHOLDS`` as ``rand_error/t<t>`` and ``pixel_error/t<t>`` (membrane where p > t),
  which :func:`best_over_thresholds` reduces after averaging over the slices; without it, the scores of the label map.
  """
  truth = np.asarray(info["mask"])[..., 0] != ISBI_MEMBRANE
  probability = info.get("foreground_probability")
  if probability is None:
    return isbi_scores(prediction != ISBI_MEMBRANE, truth)
  scores = {}
  for t in ISBI_THRESHOLDS:
    for name, value in isbi_scores(probability <= t, truth).items():
      scores[f"{name}/t{t}"] = value
  return scores


def best_over_thresholds(metrics: dict[str, float]) -> dict[str, float]:
  """Adds ``<name>`` = the smallest ``<name>/t<t>`` and ``<name>_threshold`` = its t, for each swept error metric."""
  out = dict(metrics)
  names = {k.split("/t")[0] for k in metrics if "/t" in k}
  for name in sorted(names):
    swept = {float(k.split("/t")[1]): v for k, v in metrics.items() if k.startswith(f"{name}/t") and np.isfinite(v)}
    if swept:
      threshold = min(swept, key=swept.get)
      out[name], out[f"{name}_threshold"] = swept[threshold], threshold
  return out


def instance_evaluator(prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """Data Science Bowl 2018 instance average precision (IoU 0.5:0.05:0.95) of the connected components of the
  predicted foreground (every class but 0) against the true instances."""
  if "instances" not in info:
    raise SegjaxError("evaluator 'instances' needs a dataset with instance maps; remove it from config evaluators.")
  predicted = label_instances(prediction > 0, min_size=MIN_INSTANCE_PIXELS)
  return {"instance_ap": instance_average_precision(predicted, np.asarray(info["instances"])[..., 0])}


EVALUATORS: dict[str, Evaluator] = {"isbi": isbi_evaluator, "instances": instance_evaluator}
NEEDS_INSTANCES = ("instances",)
"""Evaluators that read the dataset's instance maps."""


def evaluator_keys(names: Sequence[str]) -> tuple[str, ...]:
  """The source features the named evaluators read (kept on the host during evaluation)."""
  if not names:
    return ()
  return ("mask", "instances") if any(n in NEEDS_INSTANCES for n in names) else ("mask",)


def check_evaluators(names: Sequence[str], has_instances: bool) -> None:
  """SegjaxError before training when an evaluator needs instance maps the dataset does not have."""
  get_evaluators(names)
  if not has_instances and (needing := [n for n in names if n in NEEDS_INSTANCES]):
    raise SegjaxError(
      f"evaluator '{needing[0]}' needs a dataset with instance maps, which this dataset has not; remove it from "
      "config evaluators."
    )


def get_evaluators(names: Sequence[str]) -> tuple[Evaluator, ...]:
  """The evaluators named in the config; SegjaxError for an unknown name."""
  for name in names:
    if name not in EVALUATORS:
      raise SegjaxError(f"unknown evaluator '{name}' (config key evaluators); available: {', '.join(EVALUATORS)}.")
  return tuple(EVALUATORS[name] for name in names)


def run_evaluators(evaluators: Sequence[Evaluator], prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """All evaluators' metrics of one image in one dict."""
  metrics: dict[str, float] = {}
  for evaluator in evaluators:
    metrics.update(evaluator(prediction, info))
  return metrics
