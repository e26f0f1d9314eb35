"""Plans a segjax experiment for a folder of images and masks within a wall-clock budget (nnU-Net-style planning).

  python -m experiments.plan --image_dir=/data/mine/images --mask_dir=/data/mine/masks --time_budget=30m \
      --output=configs/mine.py
  python -m experiments.train --config=configs/mine.py --workdir=runs/mine
  python -m experiments.plan --image_dir=... --mask_dir=... --time_budget=4h --output=configs/mine.py \
      --workdir=runs/mine   # plan and train in one command

It reads the folder's fingerprint (sizes, channels, bit depth, intensities, mask values and class frequencies,
objects and how many touch; `segjax.plan.fingerprint_folder`), prints it and saves it beside the config
(``mine.fingerprint.json``), derives crop size, depth, width, batch, classes and mask mapping, loss, instance
targets and augmentation by fixed rules (`segjax.plan.plan_settings`), then builds the planned U-Net and times a
few of its train steps on this machine's device (CPU, GPU or TPU) to choose the number of steps that fills the
budget, with warm-up, evaluation and checkpoint intervals to match. The output is a normal config file (every
planned value with its reason as a comment) that starts from ``experiments/configs/folder_unet.py``; edit it or
override it on the command line like any other.
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags

from experiments import cli
from segjax import benchmark, plan
from segjax.data.folder import parse_pairs
from segjax.errors import SegjaxError
from segjax.losses import get_loss
from segjax.models import get_model
from segjax.train.loop import train_and_evaluate
from segjax.train.optim import create_optimizer
from segjax.train.state import create_train_state
from segjax.train.step import make_train_step

_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of images.", required=True)
_MASK_DIR = flags.DEFINE_string("mask_dir", None, "Folder of masks with the same names.", required=True)
_INSTANCE_DIR = flags.DEFINE_string("instance_dir", None, "Optional folder of instance-id maps with the same names.")
_SPLIT_FILES = flags.DEFINE_string(
  "split_files", None, "Optional split lists, as the config key: train:train.txt,validation:val.txt[,test:test.txt]."
)
_BUDGET = flags.DEFINE_string("time_budget", "30m", "Training time to plan for: 30m, 4h, 600s.")
_OUTPUT = flags.DEFINE_string("output", None, "Config file to write (e.g. configs/mine.py).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Also train the plan now, into this workdir (one command).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 3, "Train steps timed after the first (compiling) one.")


def time_planned_step(settings: dict, steps: int) -> tuple[float, float]:
  """(first step s including compilation, median s per step) of the planned U-Net's train step on a random batch."""
  crop, classes, channels = settings["data.crop_size"], settings["data.num_classes"], settings["data.num_channels"]
  model = get_model(
    "unet",
    num_classes=classes,
    depth=settings["model.kwargs.depth"],
    base_width=settings["model.kwargs.base_width"],
    norm="batch",
  )
  shape = (settings["batch_size"], crop, crop, channels)
  tx = create_optimizer(_optimizer_config(), 1000)
  state = create_train_state(jax.random.PRNGKey(0), model, tx, (1, *shape[1:]))
  rng = np.random.default_rng(0)
  batch = {
    "image": jax.numpy.asarray(rng.random(shape, np.float32)),
    "label": jax.numpy.asarray(rng.integers(0, classes, shape[:3]).astype(np.int32)),
  }
  step = jax.jit(make_train_step(get_loss(settings.get("loss", "softmax_cross_entropy"))), donate_argnums=0)
  first, times, _ = benchmark.time_steps(step, state, batch, steps=steps, warmup=0)
  return first, float(np.median(times))


def _optimizer_config():
  from experiments.configs import folder_unet

  return folder_unet.get_config().optimizer


def config_source(rows: list[plan.Setting], header: str, data_keys: dict[str, str]) -> str:
  """The text of a config file that starts from folder_unet and sets ``rows`` (each with its reason)."""
  lines = [
    f'"""{header}"""',
    "",
    "from experiments.configs import folder_unet",
    "",
    "",
    "def get_config():",
    "  config = folder_unet.get_config()",
  ]
  for key, value in data_keys.items():
    lines.append(f"  config.data.{key} = {value!r}")
  for row in rows:
    lines.append(f"  config.{row.key} = {row.value!r}  # {row.reason}")
  lines.append("  return config")
  return "\n".join(lines) + "\n"


def split_keys(split_files: str | None) -> dict:
  """The ``data`` keys of ``--split_files``: the lists as absolute paths, and no test split when none is listed
  (the loop would otherwise look for one after training)."""
  if not split_files:
    return {}
  files = {k: os.path.abspath(v) for k, v in parse_pairs(split_files, "--split_files").items()}
  return {"split_files": files} if "test" in files else {"split_files": files, "test_split": None}


def fingerprint_path(output: str) -> str:
  """Where the fingerprint of the plan written to ``output`` goes: ``configs/mine.py`` -> ``configs/mine.json``."""
  return os.path.splitext(output)[0] + ".fingerprint.json"


def print_fingerprint(fp: dict) -> None:
  print("| fingerprint | value |\n|---|---|")
  for key, value in fp.items():
    if isinstance(value, list) and value and isinstance(value[0], dict):
      value = "; ".join(", ".join(f"{k} {v:.3g}" for k, v in c.items()) for c in value)
    elif isinstance(value, dict):
      value = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    print(f"| {key} | {value} |")


def main(argv: list[str]) -> None:
  del argv
  budget = plan.parse_budget(_BUDGET.value)
  fp = plan.fingerprint_folder(_IMAGE_DIR.value, _MASK_DIR.value, _INSTANCE_DIR.value)
  print_fingerprint(fp)
  platform = jax.default_backend()
  rows = plan.plan_settings(fp, platform=platform)
  settings = {row.key: row.value for row in rows}
  start = time.perf_counter()
  first, per_step = time_planned_step(settings, _TIMED_STEPS.value)
  print(
    f"timed the planned step on {platform}: first {first:.1f} s, then {per_step:.2f} s per step "
    f"({time.perf_counter() - start:.0f} s)"
  )
  rows = plan.plan_settings(
    fp, seconds_per_step=per_step, first_step_seconds=first, budget_seconds=budget, platform=platform
  )
  print("| config key | value | why |\n|---|---|---|")
  for row in rows:
    print(f"| {row.key} | {row.value!r} | {row.reason} |")
  data_keys = {"image_dir": os.path.abspath(_IMAGE_DIR.value), "mask_dir": os.path.abspath(_MASK_DIR.value)}
  if _INSTANCE_DIR.value:
    data_keys["instance_dir"] = os.path.abspath(_INSTANCE_DIR.value)
  data_keys.update(split_keys(_SPLIT_FILES.value))
  header = (
    f"Planned by `python -m experiments.plan` for {data_keys['image_dir']}: {_BUDGET.value} of training on "
    f"{platform} ({jax.device_count()} device(s)). Fingerprint: {os.path.basename(fingerprint_path(_OUTPUT.value))}."
  )
  source = config_source(rows, header, data_keys)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    for path, text in ((_OUTPUT.value, source), (fingerprint_path(_OUTPUT.value), json.dumps(fp, indent=1))):
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
  except OSError as e:
    raise SegjaxError(
      f"cannot write the plan to '{_OUTPUT.value}' ({e.strerror or e}); pass a writable --output."
    ) from e
  print(f"wrote {_OUTPUT.value}; train it with: python -m experiments.train --config={_OUTPUT.value} --workdir=<dir>")
  if _WORKDIR.value:
    train_and_evaluate(cli.load_config_file(_OUTPUT.value), _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
