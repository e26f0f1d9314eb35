"""Planning an experiment from a data set's fingerprint, in the spirit of nnU-Net (Isensee et al. 2021, Nature Methods
18:203): measured properties of the data ("fingerprint"), fixed rules that turn them into settings, and, beyond
nnU-Net, a number of steps that fits a wall-clock budget from a step timed on the machine at hand.

:func:`fingerprint_folder` reads a folder data set (the layout of ``segmentation_folder``) and returns plain numbers;
:func:`plan_settings` turns a fingerprint (and a measured step time) into ``(config key, value, reason)`` rows;
``python -m experiments.plan`` times the step and writes the rows as a normal segjax config.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from segjax.data.io import images_by_stem, is_sixteen_bit, pair_by_stem, read_image, read_label
from segjax.errors import SegjaxError

PERCENTILES = (0.5, 99.5)
"""Intensity percentiles of the fingerprint (nnU-Net's CT clipping range)."""


def _image_stats(values: np.ndarray) -> dict[str, float]:
  if values.size == 0:
    return {}
  low, high = np.percentile(values, PERCENTILES)
  return {"mean": float(values.mean()), "std": float(values.std()), "p0.5": float(low), "p99.5": float(high)}


def touching_objects(instances: np.ndarray) -> tuple[int, int]:
  """(number of objects, number of them 4-adjacent to another object) of an (H, W) instance-id map."""
  ids = np.unique(instances[instances > 0])
  touching: set[int] = set()
  for a, b in ((instances[1:], instances[:-1]), (instances[:, 1:], instances[:, :-1])):
    meet = (a > 0) & (b > 0) & (a != b)
    touching.update(a[meet].tolist())
    touching.update(b[meet].tolist())
  return len(ids), len(touching)


def fingerprint_folder(
  image_dir: str,
  mask_dir: str,
  instance_dir: str | None = None,
  *,
  num_channels: int | None = None,
  max_images: int = 200,
) -> dict[str, Any]:
  """The fingerprint of a folder data set: sizes, channels, bit depth, intensity statistics (all pixels and
  foreground, i.e. mask value != 0), mask values and their pixel frequencies, and with instance maps the objects'
  counts, sizes and the share that touch another object. At most ``max_images`` images, spread over the sorted
  names, are read for the statistics (all are counted and sized from their headers)."""
  images, masks = images_by_stem(image_dir), images_by_stem(mask_dir)
  pair_by_stem(images, masks, what="mask", folder=mask_dir)
  instances = images_by_stem(instance_dir) if instance_dir else {}
  if instance_dir:
    pair_by_stem(images, instances, what="instance map", folder=instance_dir)
  stems = sorted(images)
  sample = stems[:: max(1, math.ceil(len(stems) / max_images))]
  sizes, pixels, foreground, values, objects, object_sizes, touching = [], [], [], {}, 0, [], 0
  channels = num_channels
  for stem in sample:
    mask = read_label(masks[stem])
    image = read_image(images[stem], channels or 3)
    if channels is None:  # gray when the colour channels agree
      channels = 1 if all(np.array_equal(image[..., 0], image[..., c]) for c in (1, 2)) else 3
      image = image[..., :channels]
    sizes.append(mask.shape)
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    flat = image.reshape(-1, channels).astype(np.float32) / scale
    pixels.append(flat[:: max(1, flat.shape[0] // 20000)])
    fg = flat[mask.reshape(-1) != 0]
    foreground.append(fg[:: max(1, fg.shape[0] // 20000)])
    for value, count in zip(*np.unique(mask, return_counts=True), strict=True):
      values[int(value)] = values.get(int(value), 0) + int(count)
    if instances:
      ids = read_label(instances[stem])
      n, t = touching_objects(ids)
      objects, touching = objects + n, touching + t
      counts = np.bincount(ids.reshape(-1))[1:]
      object_sizes.extend(counts[counts > 0].tolist())
  all_pixels, fg_pixels = np.concatenate(pixels), np.concatenate(foreground)
  heights, widths = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
  total = sum(values.values())
  out = {
    "num_images": len(stems),
    "num_sampled": len(sample),
    "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
    "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
    "channels": int(channels),
    "bit_depth": 16 if any(is_sixteen_bit(images[s]) for s in sample) else 8,
    "intensity": [_image_stats(all_pixels[:, c]) for c in range(channels)],
    "foreground_intensity": [_image_stats(fg_pixels[:, c]) for c in range(channels)],
    "mask_values": sorted(values),
    "value_frequencies": {str(v): c / total for v, c in sorted(values.items())},
  }
  if instances:
    sizes_array = np.asarray(object_sizes or [0])
    out["objects"] = {
      "per_image_mean": objects / len(sample),
      "size_median": float(np.median(sizes_array)),
      "size_p5": float(np.percentile(sizes_array, 5)),
      "size_p95": float(np.percentile(sizes_array, 95)),
      "touching_fraction": touching / max(objects, 1),
    }
  return out


@dataclasses.dataclass(frozen=True)
class Setting:
  """One planned config value and why."""

  key: str
  value: Any
  reason: str


def _floor_multiple(n: float, multiple: int) -> int:
  return int(n // multiple) * multiple


def plan_settings(
  fp: Mapping[str, Any],
  *,
  seconds_per_step: float | None = None,
  first_step_seconds: float = 0.0,
  budget_seconds: float | None = None,
  platform: str = "cpu",
) -> list[Setting]:
  """Rule-based settings from a fingerprint (Isensee et al. 2021's "rule-based parameters", for 2D images), and with
  a measured ``seconds_per_step`` the number of steps that fills ``budget_seconds`` of training.

  The geometry rows (crop size, depth, base width, batch size) come first and do not depend on the step time, so
  :func:`plan_settings` is called once to get the model to time and again with the measurement.
  """
  rows: list[Setting] = []
  side = min(fp["height"]["median"], fp["width"]["median"])
  smallest = min(fp["height"]["min"], fp["width"]["min"])
  cap = 256 if platform == "cpu" else 512
  crop = max(32, min(cap, _floor_multiple(side, 32)))
  reason = f"median image {fp['height']['median']:g}x{fp['width']['median']:g}: the largest multiple of 32 in it, "
  reason += f"at most {cap} on {platform}"
  if smallest < crop:
    reason += f"; images as small as {smallest} px are mirrored up to it"
  rows.append(Setting("data.crop_size", crop, reason))
  depth = int(max(2, min(5, math.floor(math.log2(crop / 8)))))
  rows.append(
    Setting(
      "model.kwargs.depth", depth, f"pool until the bottleneck is {crop // 2**depth} px (nnU-Net: about 4-8), at most 5"
    )
  )
  width = 16 if platform == "cpu" else 32
  rows.append(
    Setting(
      "model.kwargs.base_width",
      width,
      f"{'CPU: a narrow net trains more steps in the budget' if platform == 'cpu' else 'accelerator'}",
    )
  )
  batch = 8 if platform == "cpu" else 16
  rows.append(Setting("batch_size", batch, f"{platform} default for {crop}x{crop} crops of a width-{width} U-Net"))
  rows.append(Setting("data.eval_size_multiple", 2**depth, "whole images padded to the pooling grid"))

  values = fp["mask_values"]
  mapping = None
  if values == [0, 255]:
    mapping = "0:0,255:1"
    classes = 2
  elif values == list(range(len(values))):
    classes = max(2, len(values))
  else:
    mapping = ",".join(f"{v}:{i}" for i, v in enumerate(values))
    classes = len(values)
  rows.append(Setting("data.num_classes", classes, f"mask values {values}"))
  if mapping:
    rows.append(Setting("data.mask_values", mapping, "mask values mapped to consecutive class ids"))
  rows.append(Setting("data.num_channels", fp["channels"], f"{fp['channels']}-channel {fp['bit_depth']}-bit images"))
  low = min(stats["p0.5"] for stats in fp["intensity"])
  high = max(stats["p99.5"] for stats in fp["intensity"])
  if high - low < 0.5:  # e.g. 16-bit EM or dim fluorescence using a fraction of the range
    rows.append(
      Setting(
        "data.normalization",
        "percentile",
        f"0.5-99.5 percentiles {low:.3f}-{high:.3f} use {high - low:.0%} of the range: clipped and stretched "
        "(nnU-Net's CT scheme)",
      )
    )
    rows.append(
      Setting("data.intensity_range", (round(low, 5), round(high, 5)), "the fingerprint's 0.5 / 99.5 percentiles")
    )
  else:
    rows.append(Setting("data.normalization", "scale", f"0.5-99.5 percentiles use {high - low:.0%} of the range"))
  freqs = [f for v, f in fp["value_frequencies"].items() if int(v) != 0]
  rare = min(freqs) if freqs else 1.0
  if rare < 0.05:
    rows.append(Setting("loss", "dice_cross_entropy", f"rarest class {rare:.1%} of pixels: Dice + CE as nnU-Net"))
  else:
    rows.append(Setting("loss", "softmax_cross_entropy", f"rarest class {rare:.1%} of pixels: plain cross-entropy"))
  objects = fp.get("objects")
  if objects and objects["touching_fraction"] > 0.05:
    reason = f"{objects['touching_fraction']:.0%} of objects touch another: contour targets and the watershed"
    rows.append(Setting("instances.targets", "contour", reason))
    rows.append(Setting("instances.method", "watershed", "splits touching objects"))
    rows.append(Setting("instances.min_size", max(1, int(objects["size_p5"] // 2)), "half the 5th-percentile object"))
    rows.append(Setting("evaluators", ("instances",), "instance scores (AP, AJI, PQ, F1)"))
  ops = ("flip", "rot90", "scale_crop", "intensity") + (("elastic",) if fp["channels"] == 1 else ())
  rows.append(
    Setting(
      "augment.ops",
      ops,
      "flips, rotations, scaling, intensity"
      + ("; elastic deformation for gray microscopy (U-Net paper)" if fp["channels"] == 1 else ""),
    )
  )

  if seconds_per_step and budget_seconds:
    usable = 0.9 * budget_seconds - first_step_seconds  # a tenth for evaluation and checkpoints
    steps = max(10, int(usable / seconds_per_step))
    rows.append(
      Setting(
        "num_train_steps",
        steps,
        f"{budget_seconds / 60:g} min budget at {seconds_per_step:.2f} s "
        f"per step measured here (first step {first_step_seconds:.0f} s), a tenth kept for evaluation",
      )
    )
    warmup = max(1, min(50, steps // 20))
    rows.append(Setting("optimizer.warmup_steps", warmup, "5% of the steps, at most 50"))
    every = max(1, steps // 4)
    rows.append(Setting("eval_every_steps", every, "four evaluations"))
    rows.append(Setting("checkpoint_every_steps", every, "with each evaluation"))
    rows.append(Setting("log_every_steps", max(1, min(50, steps // 20)), "twenty log points"))
  return _last_wins(rows)


def _last_wins(rows: list[Setting]) -> list[Setting]:
  by_key: dict[str, Setting] = {}
  for row in rows:
    by_key.pop(row.key, None)
    by_key[row.key] = row
  return list(by_key.values())


def parse_budget(text: str) -> float:
  """``'30m'``, ``'4h'``, ``'90s'`` or seconds -> seconds; SegjaxError for anything else."""
  units = {"s": 1, "m": 60, "h": 3600}
  try:
    if text[-1:] in units:
      value = float(text[:-1]) * units[text[-1]]
    else:
      value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise SegjaxError(f"--time_budget must be a duration like 30m, 4h or 600s, got {text!r}.")
  return value
