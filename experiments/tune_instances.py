"""Chooses the instance post-processing of a trained run on its validation split, and scores the test split with it.

  python -m experiments.tune_instances --workdir=runs/dsb2018_contour

The marker-controlled watershed (`segjax.instances.instances_from_predictions`) has three settings that depend on how
sure the trained network is: the interior probability (or depth) that seeds an instance (``marker_threshold``), the
foreground probability (``foreground_threshold``) and the smallest kept instance (``min_size``). nnU-Net likewise
decides its post-processing on held-out predictions after training (Isensee et al. 2021, Nature Methods 18:203). This
predicts every image of the validation split once (whole, with the run's ``eval_tta``), scores every combination of
the grid with the Data Science Bowl 2018 average precision (`segjax.metrics.instance_scores`, per image, averaged),
prints the best, and writes it to ``<workdir>/instances.json``: `segjax.inference.load_predictor` (and so
``experiments.predict --outputs=instances``) applies that file over the run's ``config.instances``. The test split
is then scored with the run's own settings and with the chosen ones; it plays no part in the choice.
"""

import dataclasses
import itertools
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from segjax.data import load_dataset
from segjax.errors import SegjaxError
from segjax.inference import TUNED_INSTANCES_FILE, load_predictor
from segjax.metrics import instance_scores
from segjax.tiling import Tiling

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run trained on instance targets.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Split the settings are chosen on (default: the run's data.eval_split).")
_TEST_SPLIT = flags.DEFINE_string(
  "test_split", None, "Split scored with the chosen settings (default: the run's data.test_split; '' for none)."
)
_MARKER = flags.DEFINE_list("marker_thresholds", ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8"], "marker_threshold grid.")
_FOREGROUND = flags.DEFINE_list("foreground_thresholds", ["0.4", "0.5", "0.6"], "foreground_threshold grid.")
_MIN_SIZE = flags.DEFINE_list("min_sizes", ["5", "10", "20"], "min_size grid (pixels).")
_TTA = flags.DEFINE_string("tta", None, "Test-time augmentation (default: the run's eval_tta).")
_WRITE = flags.DEFINE_boolean("write", True, f"Write the chosen settings to <workdir>/{TUNED_INSTANCES_FILE}.")

SCORE = "instance_ap"
"""The quantity the settings are chosen by: the DSB 2018 score."""


def predict_split(predictor, source, tiling: Tiling) -> list[tuple[np.ndarray, np.ndarray]]:
  """(probabilities, true instance ids) of every example of ``source``, predicted whole."""
  examples = []
  for index in range(len(source)):
    example = source[index]
    if "instances" not in example:
      raise SegjaxError("tune_instances needs a data set with instance maps (data.instance_dir for a folder).")
    examples.append((predictor.predict(np.asarray(example["image"]), tiling), np.asarray(example["instances"])[..., 0]))
  return examples


def mean_scores(settings, examples) -> dict[str, float]:
  """Instance scores of ``settings`` (an InstanceSettings) averaged over the images, as the loop's evaluator."""
  rows = [instance_scores(settings.to_instances(probabilities), truth) for probabilities, truth in examples]
  return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def grid(settings) -> list:
  """Every combination of the flags' grids, as InstanceSettings derived from the run's."""
  combos = itertools.product(
    (float(v) for v in _MARKER.value), (float(v) for v in _FOREGROUND.value), (int(v) for v in _MIN_SIZE.value)
  )
  return [dataclasses.replace(settings, marker_threshold=m, foreground_threshold=f, min_size=s) for m, f, s in combos]


def main(argv: list[str]) -> None:
  del argv
  predictor = load_predictor(_WORKDIR.value, _STEP.value, tuned=False)
  config, run_settings = predictor.config, predictor.instances
  if run_settings.targets is None or run_settings.method != "watershed":
    raise SegjaxError(
      f"{_WORKDIR.value} was not trained for the watershed (config instances.targets 'contour' or 'distance' and "
      "instances.method 'watershed'); there is nothing to tune."
    )
  dataset = load_dataset(config.data)
  tiling = Tiling(tta=_TTA.value or config.eval_tta)
  split = _SPLIT.value or config.data.eval_split
  start = time.perf_counter()
  examples = predict_split(predictor, dataset.split(split), tiling)
  logging.info("predicted %d %s images in %.0f s", len(examples), split, time.perf_counter() - start)

  results = [(candidate, mean_scores(candidate, examples)) for candidate in grid(run_settings)]
  results.sort(key=lambda item: -item[1][SCORE])
  own = mean_scores(run_settings, examples)
  print(f"{split} split, step {predictor.step}, {len(examples)} images; the run's settings: {SCORE} {own[SCORE]:.4f}")
  print("| marker_threshold | foreground_threshold | min_size | instance AP | AJI | PQ | F1@0.5 |")
  print("|---|---|---|---|---|---|---|")
  for candidate, scores in results[:10]:
    print(
      f"| {candidate.marker_threshold} | {candidate.foreground_threshold} | {candidate.min_size} | "
      f"{scores['instance_ap']:.4f} | {scores['aji']:.4f} | {scores['pq']:.4f} | {scores['f1']:.4f} |"
    )
  best, best_scores = results[0]
  record = {
    "step": predictor.step,
    "split": split,
    "settings": {k: getattr(best, k) for k in ("marker_threshold", "foreground_threshold", "min_size")},
    split: best_scores,
    f"{split}/run_settings": own,
  }
  test_split = config.data.test_split if _TEST_SPLIT.value is None else _TEST_SPLIT.value
  if test_split:
    test = predict_split(predictor, dataset.split(test_split), tiling)
    record[test_split] = mean_scores(best, test)
    record[f"{test_split}/run_settings"] = mean_scores(run_settings, test)
    for name in (f"{test_split}/run_settings", test_split):
      scores = record[name]
      print(f"{name}: " + ", ".join(f"{k} {scores[k]:.4f}" for k in ("instance_ap", "aji", "pq", "f1")))
  if _WRITE.value:
    path = os.path.join(_WORKDIR.value, TUNED_INSTANCES_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {record['settings']} (applied by segjax.inference.load_predictor)")


if __name__ == "__main__":
  app.run(main)
