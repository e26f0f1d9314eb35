"""A plain PyTorch training loop for a folder data set, the reference segjax's defaults are compared against.

  python -m experiments.torch_reference --folder=runs/folders/isbi2012 --budget=600 --evaluator=isbi \
      --output=runs/torch_isbi.json

The loop is deliberately plain: segjax's same-padded U-Net architecture (`experiments.torch_models.torch_unet`,
conv -> BatchNorm -> ReLU, transposed-convolution up-sampling), Adam at a constant learning rate, random square crops
with flips and 90-degree rotations, batch 8, plain cross-entropy; no schedule, clipping, scale or intensity
augmentation. It trains until ``--budget`` seconds of training (evaluation excluded) have passed, then predicts
each validation and test image whole, mirrored at its borders up to a multiple of 2**depth, and scores it with
segjax's metrics (`segjax.metrics`), so both frameworks are scored by the same code. The folder is the layout of
`experiments.export_folders` (``images/``, ``masks/`` of class ids, optional ``instances/``, ``<split>.txt``).
PyTorch is a test/benchmark extra (requirements-test.txt), never needed by segjax itself.
"""

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments.torch_models import torch_unet
from segjax import metrics
from segjax.data.io import images_by_stem, open_image, read_image, read_label
from segjax.data.pipeline import normalize_image

_FOLDER = flags.DEFINE_string("folder", None, "Folder written by experiments.export_folders.", required=True)
_BUDGET = flags.DEFINE_float("budget", 600.0, "Seconds of training (evaluation not counted).")
_STEPS = flags.DEFINE_integer("steps", None, "Train this many steps instead of for --budget seconds.")
_EVALUATOR = flags.DEFINE_enum("evaluator", "none", ["none", "isbi", "instances"], "Per-image scores to add.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")
_CHANNELS = flags.DEFINE_integer("num_channels", None, "Image channels (default: those of the first image, 1 or 3).")
_CLASSES = flags.DEFINE_integer("num_classes", 2, "Classes in the masks.")
_DEPTH = flags.DEFINE_integer("depth", 4, "U-Net depth (pooling steps).")
_WIDTH = flags.DEFINE_integer("width", 16, "U-Net base width.")
_CROP = flags.DEFINE_integer("crop_size", 256, "Side of the random training crops.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per step.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Adam's constant learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, crops and flips.")
_INIT = flags.DEFINE_enum(
  "init", "torch", ["torch", "he"], "Weights: PyTorch's default init, or segjax's (He normal, zero biases)."
)
_THREADS = flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: PyTorch's choice).")


def read_split(folder: str, split: str, num_channels: int) -> list[dict[str, np.ndarray]]:
  """The examples of ``<folder>/<split>.txt``: float32 image in [0, 1], int64 mask and optional instance ids."""
  path = os.path.join(folder, f"{split}.txt")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    stems = [line.strip() for line in f if line.strip()]
  images, masks = images_by_stem(os.path.join(folder, "images")), images_by_stem(os.path.join(folder, "masks"))
  instances = (
    images_by_stem(os.path.join(folder, "instances")) if os.path.isdir(os.path.join(folder, "instances")) else {}
  )
  examples = []
  for stem in stems:
    example = {"image": normalize_image(read_image(images[stem], num_channels)), "mask": read_label(masks[stem])}
    if stem in instances:
      example["instances"] = read_label(instances[stem])
    examples.append(example)
  return examples


def image_channels(folder: str) -> int:
  """1 for a grayscale first image of ``<folder>/images``, else 3."""
  with open_image(sorted(images_by_stem(os.path.join(folder, "images")).values())[0]) as img:
    return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L") else 3


def random_batch(examples: list, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
  """One step's crops: ``batch`` random images, each cropped at random, flipped and rotated."""
  crop = _CROP.value
  images, masks = [], []
  for _ in range(_BATCH.value):
    example = examples[int(rng.integers(len(examples)))]
    image, mask = example["image"], example["mask"]
    pad_h, pad_w = max(crop - mask.shape[0], 0), max(crop - mask.shape[1], 0)
    if pad_h or pad_w:  # mirror small images up to the crop; their added pixels are ignored by the loss
      image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
      mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=255)
    top, left = rng.integers(0, mask.shape[0] - crop + 1), rng.integers(0, mask.shape[1] - crop + 1)
    image, mask = image[top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    k = int(rng.integers(0, 4))
    images.append(np.rot90(image, k).transpose(2, 0, 1))
    masks.append(np.rot90(mask, k))
  return np.ascontiguousarray(np.stack(images)), np.ascontiguousarray(np.stack(masks)).astype(np.int64)


def predict(torch, model, image: np.ndarray, multiple: int) -> np.ndarray:
  """(H, W, C) image -> (H, W, classes) softmax probabilities of the whole image, mirrored to a multiple."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
  with torch.no_grad():
    logits = model(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None])
  return torch.softmax(logits, 1)[0, :, :height, :width].permute(1, 2, 0).numpy()


def evaluate(torch, model, examples: list, num_classes: int, evaluator: str) -> dict[str, float]:
  """Split-level IoU / Dice (segjax.metrics.summarize_confusion) and the evaluator's per-image or pooled scores."""
  model.eval()
  confusion = np.zeros((num_classes, num_classes), np.int64)
  probabilities, labels, ap = [], [], []
  for example in examples:
    p = predict(torch, model, example["image"], 2**_DEPTH.value)
    mask, prediction = example["mask"], p.argmax(-1)
    valid = mask < num_classes
    confusion += np.bincount(
      mask[valid] * num_classes + prediction[valid], minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    if evaluator == "isbi":
      probabilities.append(p[..., 1])
      labels.append(mask)
    elif evaluator == "instances":
      predicted = metrics.label_instances(prediction > 0, min_size=10)
      ap.append(metrics.instance_average_precision(predicted, example["instances"]))
  out = metrics.summarize_confusion(confusion)
  if evaluator == "isbi" and labels:
    errors = metrics.isbi_challenge_errors(np.stack(probabilities), np.stack(labels))
    out.update({k: v for k, v in errors.items() if "/" not in k})
  elif evaluator == "instances":
    out["instance_ap"] = float(np.mean(ap))
  model.train()
  return out


def main(argv):
  del argv
  import torch

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  torch.manual_seed(_SEED.value)
  rng = np.random.default_rng(_SEED.value)
  channels = _CHANNELS.value or image_channels(_FOLDER.value)
  splits = {s: read_split(_FOLDER.value, s, channels) for s in ("train", "validation", "test")}
  model = torch_unet(
    torch,
    depth=_DEPTH.value,
    width=_WIDTH.value,
    in_channels=channels,
    num_classes=_CLASSES.value,
    valid=False,
    norm=True,
  )
  if _INIT.value == "he":  # segjax's U-Net init: He et al. 2015 normal (variance 2 / fan_in), biases 0
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
        fan_in = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.weight[:, 0].numel()
        torch.nn.init.normal_(module.weight, 0.0, (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          torch.nn.init.zeros_(module.bias)
  optimizer = torch.optim.Adam(model.parameters(), lr=_LR.value)
  loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
  step, trained, losses = 0, 0.0, []
  while (step < _STEPS.value) if _STEPS.value else (trained < _BUDGET.value):
    start = time.perf_counter()
    images, masks = random_batch(splits["train"], rng)
    loss = loss_fn(model(torch.from_numpy(images)), torch.from_numpy(masks))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    trained += time.perf_counter() - start
    step += 1
  results = {
    "framework": "torch",
    "steps": step,
    "train_seconds": trained,
    "final_loss": float(np.mean(losses[-20:])),
    "parameters": sum(p.numel() for p in model.parameters()),
  }
  for split in ("validation", "test"):
    if splits[split]:
      results[split] = evaluate(torch, model, splits[split], _CLASSES.value, _EVALUATOR.value)
  print(json.dumps(results, indent=1))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
