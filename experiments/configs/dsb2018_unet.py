"""Nuclei of the Data Science Bowl 2018 with a U-Net trained on the border weight map (Ronneberger et al. 2015, Eq. 2).

  python -m experiments.train --config=experiments/configs/dsb2018_unet.py --workdir=runs/dsb2018
  python -m experiments.train --config=experiments/configs/dsb2018_unet.py:contour --workdir=runs/dsb2018_contour

RGB images of nine sizes are cut into random 256x256 training tiles; touching nuclei are pulled apart by the weight
map's border term (w0 = 10, sigma = 5 px). The validation and test splits (a
fixed 10% each of the sorted ids) are scored with per-class IoU and the DSB 2018 instance average precision over
IoU thresholds 0.5:0.05:0.95 of the connected components of the predicted nuclei. The data is read from
``data.manual_dir`` (default ``$SEGJAX_DATA/dsb2018`` or ``../shared/data/dsb2018``).

Variants: ``semantic`` (default) learns nucleus / background; connected components of even the true foreground merge
the touching nuclei (validation AP 0.814 at best). ``contour`` learns background / interior / boundary targets made
from the instance maps and separates the nuclei by a marker-controlled watershed (segjax.instances); ``distance``
learns levels of the normalised distance to the boundary (Bai & Urtasun 2017) with the same watershed. Both report
the instance scores of the watershed and, as ``<metric>/components``, of the connected components.
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ``semantic`` (default), ``contour`` or ``distance`` config; each sized for about 20 minutes on a
  2-core CPU (raise num_train_steps on an accelerator)."""
  variant = variant or "semantic"
  if variant not in ("semantic", "contour", "distance"):
    raise ValueError(f"unknown dsb2018_unet variant '{variant}'; use semantic, contour or distance.")
  config = default.get_config()
  config.data = data_section("dsb2018")
  config.data.crop_size = 256
  # The border term pulls touching nuclei apart; class balancing is off (w_c = 1) because with it the network
  # over-predicts the rare class (see the isbi2012 ablation in README.md); 'balanced' switches it on.
  config.data.weight_map.enabled = True
  config.data.weight_map.class_weights = None
  config.model.kwargs = ml_collections.ConfigDict(
    {"depth": 4, "base_width": 16, "norm": "batch", "upsample": "transpose", "dropout_rate": 0.0}
  )
  config.augment = ml_collections.ConfigDict(
    {
      "ops": ("flip", "rot90", "scale_crop", "elastic", "intensity"),
      "scale_crop": {"min_scale": 0.75, "max_scale": 1.33},
    }
  )
  config.evaluators = ("instances",)
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 1500
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 250
  config.num_sample_images = 4
  config.num_test_images = 8
  if variant != "semantic":
    config.instances.update({"targets": variant, "method": "watershed"})
  return config
