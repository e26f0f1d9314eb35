"""The input pipeline: grain over random-access (TFDS array_record) data sources.

Training batches are addressed by step: the global batch of step ``s`` holds elements ``[s*B, (s+1)*B)`` of one
infinite, seeded shuffle of the split (reshuffled each epoch). It is therefore a pure function of (seed, s), the
number of reader threads does not change it, and resuming at step ``s`` needs no iterator state but ``s`` itself.
With several processes, process ``p`` of ``P`` reads every P-th element of that stream, so the union of the
per-process batches of step ``s`` is exactly the single-process global batch of step ``s``.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from segjax.errors import SegjaxError

Example = dict[str, np.ndarray]


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 (or uint16) image (H, W, C) -> float32 in [0, 1]. Training and prediction both go through here."""
  scale = 65535.0 if image.dtype == np.uint16 else 255.0
  return image.astype(np.float32) / scale


def to_model_inputs(features: Mapping[str, Any]) -> Example:
  """Decoded dataset features -> the model's inputs: ``image`` float32 (H, W, C), ``label`` int32 (H, W)."""
  out = {"image": normalize_image(np.asarray(features["image"])), "label": np.asarray(features["mask"])[..., 0]}
  out["label"] = out["label"].astype(np.int32)
  return out


def train_dataset(
  source: Any, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """An infinite dataset whose element ``s`` is this process's part of the global training batch of step ``s``.

  Args:
    source: a random-access source of feature dicts (``len`` and ``__getitem__``).
    batch_size: the GLOBAL batch size; must be divisible by ``process_count``.
    seed: the shuffle seed.
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
  """
  if batch_size % process_count:
    raise SegjaxError(
      f"batch_size {batch_size} (config key batch_size) is not divisible by the {process_count} processes; "
      "make it a multiple."
    )
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  return ds.map(to_model_inputs).batch(batch_size // process_count, drop_remainder=True)


def train_batches(dataset: grain.MapDataset, *, start_step: int = 0, num_threads: int = 2) -> Iterator[Example]:
  """Iterates ``dataset[start_step], dataset[start_step + 1], ...`` with background reader threads."""
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 2))
  return iter(dataset[start_step:].to_iter_dataset(read_options))


def eval_batches(source: Any, *, batch_size: int) -> Iterator[Example]:
  """The whole split in order, in fixed-size batches; the last one is padded and carries ``weights`` of 0 there.

  Every batch has the same shape, so the eval step compiles once; pixels with weight 0 count in no metric.
  """
  n = len(source)
  for start in range(0, n, batch_size):
    examples = [to_model_inputs(source[i]) for i in range(start, min(start + batch_size, n))]
    valid = len(examples)
    examples += [examples[-1]] * (batch_size - valid)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    weights = np.zeros(batch["label"].shape, np.float32)
    weights[:valid] = 1.0
    batch["weights"] = weights
    yield batch


def prefetch_to_device(batches: Iterator[Example], size: int = 2, sharding: Any = None) -> Iterator[Any]:
  """Keeps ``size`` batches in flight to the device(s) so host-to-device copies overlap with compute."""
  queue = []
  for batch in batches:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
