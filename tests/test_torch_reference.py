"""The PyTorch reference loop's U-Net trains step for step like segjax's: a gap between the two frameworks at equal
steps can then only come from the data, the recipe or chance, never from the model, its gradients or the optimizer.

Both start from the same weights (`experiments.torch_models.flax_unet_params`) and take Adam steps on the same
batches in training mode (BatchNorm on batch statistics), with segjax's CPU layer forms as the tests run them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.torch_models import flax_unet_params, torch_unet
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model

torch = pytest.importorskip("torch")

DEPTH, WIDTH = 2, 4


def _batches(count: int) -> tuple[np.ndarray, np.ndarray]:
  from scipy import ndimage

  rng = np.random.default_rng(0)
  noise = rng.random((count, 4, 32, 32)).astype(np.float32)
  images = np.stack([[ndimage.gaussian_filter(x, 2) for x in batch] for batch in noise])
  images = (images - images.min()) / (images.max() - images.min())
  return images[..., None], (images > 0.5).astype(np.int32)


def test_segjax_unet_and_the_torch_reference_take_the_same_adam_steps():
  torch.manual_seed(0)
  reference = torch_unet(torch, depth=DEPTH, width=WIDTH, in_channels=1, num_classes=2, valid=False, norm=True)
  model = get_model("unet", num_classes=2, depth=DEPTH, base_width=WIDTH, norm="batch", upsample="transpose")
  images, labels = _batches(6)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[0]), train=False)
  params = jax.tree_util.tree_map(jnp.asarray, flax_unet_params(reference, depth=DEPTH, width=WIDTH))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(variables["params"])
  batch_stats = variables["batch_stats"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return softmax_cross_entropy(logits, y), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3)
  reference.train()
  ours, theirs = [], []
  for x, y in zip(images, labels, strict=True):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, jnp.asarray(x), jnp.asarray(y))
    torch_loss = torch.nn.functional.cross_entropy(
      reference(torch.from_numpy(x.transpose(0, 3, 1, 2))), torch.from_numpy(y).long()
    )
    optimizer.zero_grad()
    torch_loss.backward()
    optimizer.step()
    ours.append(float(loss))
    theirs.append(torch_loss.item())
  assert ours[-1] < 0.8 * ours[0]  # it learns
  np.testing.assert_allclose(ours, theirs, rtol=2e-3)
  # and the trained weights agree: the classifier after six steps
  np.testing.assert_allclose(
    np.asarray(params["classifier"]["kernel"]),
    flax_unet_params(reference, depth=DEPTH, width=WIDTH)["classifier"]["kernel"],
    atol=2e-3,
  )
