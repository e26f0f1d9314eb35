"""The one base config (:func:`segjax.config.base_config`): every key an experiment has, with its default. Every
config in this folder starts here and overrides what it changes; `segjax.train.setup.validate_config` (the first
step of `setup.build`) checks the values.
"""

import ml_collections

from segjax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  """The base config; ``data.name`` must be set by the experiment."""
  return base_config()
