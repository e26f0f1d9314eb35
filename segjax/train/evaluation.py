"""Evaluation of a whole split: confusion counts and losses summed on device over every batch (and over processes),
per-image evaluators (ISBI errors, instance scores) on the host, and the first images' predictions for pictures."""

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from segjax.data.instance_targets import InstanceSettings
from segjax.data.pipeline import Normalization, eval_batches, to_model_inputs
from segjax.metrics import summarize_confusion
from segjax.models.geometry import Geometry
from segjax.train import parallel
from segjax.train.evaluators import best_over_thresholds, evaluator_keys, get_evaluators, run_evaluators
from segjax.train.state import TrainState


def evaluate(
  state: TrainState,
  eval_step,
  source: Any,
  *,
  batch_size: int,
  num_classes: int,
  geometry: Geometry,
  evaluators: Sequence[str] = (),
  instances: InstanceSettings | None = None,
  mesh: Mesh | None = None,
  evaluator_fns: Sequence[Callable] | None = None,
  normalization: Normalization | None = None,
) -> dict[str, float]:
  """Runs ``eval_step`` over a whole split and returns the split's loss and metrics.

  With several processes, process p evaluates images p, p + P, ...; within a process each batch is split over its
  devices of ``mesh`` (padded with zero-weight examples to a multiple of their number). Confusion counts and losses
  are summed on device, then over processes; the per-image ``evaluators`` (e.g. the ISBI Rand error) run on the host
  on each predicted label map, cropped to its image, and are averaged over all images of the split.

  Args:
    state: the state to evaluate, on this process's devices of ``mesh`` (:func:`segjax.train.parallel.to_local`).
    instances: how the ``instances`` evaluator turns predictions into instances (``config.instances``).
    mesh: the training mesh; None evaluates on the default device.
    evaluator_fns: the ``evaluators`` already built (:func:`segjax.train.evaluators.get_evaluators`, as
      :func:`segjax.train.setup.build` does once per run); by default built here from the names.
    normalization: how the images' intensities become the model's input (``data.normalization``; default 'scale').
  """
  if evaluator_fns is None:
    evaluator_fns = get_evaluators(evaluators, instances=instances)
  keep = evaluator_keys(evaluators)
  prepare = functools.partial(to_model_inputs, num_classes=num_classes, normalization=normalization)
  if jax.process_count() > 1:
    source = _Strided(source, jax.process_index(), jax.process_count())
  devices = parallel.local_devices(mesh) if mesh is not None else jax.local_devices()[:1]
  sharding = parallel.batch_sharded(Mesh(np.asarray(devices), (parallel.DATA_AXIS,)))
  totals, per_image = None, []
  for batch, infos in eval_batches(source, batch_size=batch_size, prepare=prepare, geometry=geometry, keep=keep):
    out = eval_step(state, jax.device_put(_pad_examples(batch, len(devices)), sharding))
    predictions = out.pop("predictions")
    # class 1's probability (two classes) or all of them, for evaluators that threshold or post-process them
    probabilities = {k: out.pop(k) for k in ("foreground_probability", "probabilities") if k in out}
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    if evaluator_fns:
      predictions = np.asarray(predictions)
      probabilities = {k: np.asarray(v) for k, v in probabilities.items()}
      for i, info in enumerate(infos):
        height, width = info["size"]
        info = {**info, **{k: v[i, :height, :width] for k, v in probabilities.items()}}
        per_image.append(run_evaluators(evaluator_fns, predictions[i, :height, :width], info))
  if totals is None:  # a process with no image of this split
    totals = {"confusion": np.zeros((num_classes, num_classes), np.float32), "loss_sum": 0.0, "weight_sum": 0.0}
  totals = jax.tree_util.tree_map(np.asarray, jax.device_get(totals))
  if jax.process_count() > 1:
    totals = jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x).sum(0), totals)
    per_image = [m for part in _allgather_json(per_image) for m in part]
  metrics = {
    "loss": float(totals["loss_sum"] / max(float(totals["weight_sum"]), 1.0)),
    **summarize_confusion(totals["confusion"]),
  }
  for key in per_image[0] if per_image else ():
    # NaN for an image where a metric is undefined (e.g. no cells): averaged over the images where it is defined.
    metrics[key] = _nanmean([m[key] for m in per_image])
  return best_over_thresholds(metrics)


class _Strided:
  """Examples ``start, start + step, ...`` of a random-access source."""

  def __init__(self, source: Any, start: int, step: int):
    self._source, self._indices = source, range(start, len(source), step)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[self._indices[index]]


def _pad_examples(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads a batch with all-zero examples (weight 0: they count nowhere) to a multiple of ``multiple`` examples."""
  missing = -len(batch["image"]) % multiple
  if not missing:
    return batch
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable ``value``, in process order (a collective: all processes must call it)."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths, strict=True)]


def _nanmean(values: list[float]) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def predict_split(
  state: TrainState,
  eval_step,
  source: Any,
  *,
  batch_size: int,
  num_classes: int,
  geometry: Geometry,
  limit: int,
  normalization: Normalization | None = None,
) -> tuple[list[np.ndarray], ...]:
  """Images, labels and predicted label maps (each at its image's size) of the first ``limit`` examples of a split."""
  images, labels, predictions = [], [], []
  prepare = functools.partial(to_model_inputs, num_classes=num_classes, normalization=normalization)
  for index in range(min(limit, len(source))):
    batches = eval_batches([source[index]], batch_size=1, prepare=prepare, geometry=geometry, keep=("mask",))
    batch, (info,) = next(batches)
    height, width = info["size"]
    m = geometry.margin
    images.append(batch["image"][0, m : m + height, m : m + width])
    labels.append(batch["label"][0, m : m + height, m : m + width])
    predictions.append(np.asarray(eval_step(state, jax.device_put(batch))["predictions"])[0, :height, :width])
  return images, labels, predictions
