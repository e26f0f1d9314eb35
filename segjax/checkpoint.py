"""The former place of :mod:`segjax.train.checkpoint` (checkpoints restore a ``TrainState``, so they live with it);
``segjax.checkpoint`` stays the same module object for existing code."""

import sys

from segjax.train import checkpoint as _checkpoint

sys.modules[__name__] = _checkpoint
