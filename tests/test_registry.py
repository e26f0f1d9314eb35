"""The one registry mechanism (segjax.registry.Registry) and that every registry of segjax is one."""

import pytest

from segjax import models
from segjax.data import DATASETS
from segjax.data.augment import AUGMENTATIONS
from segjax.errors import SegjaxError
from segjax.losses import LOSSES, model_outputs
from segjax.registry import Registry, import_modules
from segjax.train.evaluators import EVALUATORS, check_evaluators, evaluator_keys
from segjax.train.optim import OPTIMIZERS, SCHEDULES


def test_register_lookup_metadata_and_the_one_unknown_name_error():
  registry = Registry("widget", "model.kwargs.widget")

  @registry.register("b10", size=10)
  def b10():
    return 10

  registry["b2"] = lambda: 2  # the mapping form registers too, without metadata
  assert registry.lookup("b10") is b10 and registry["b10"] is b10
  assert registry.names() == ["b2", "b10"]  # numbers in numeric order
  assert list(registry) == ["b10", "b2"]  # iteration: registration order
  assert dict(registry.metadata("b10")) == {"size": 10} and dict(registry.metadata("b2")) == {}
  assert registry.where(lambda meta: meta.get("size", 0) > 5) == ("b10",)
  with pytest.raises(TypeError):
    registry.metadata("b10")["size"] = 3  # read-only
  with pytest.raises(SegjaxError) as error:
    registry.lookup("b3")
  assert str(error.value) == "unknown widget 'b3' (config key model.kwargs.widget); available: b2, b10."
  with pytest.raises(SegjaxError, match="unknown widget 'b3'"):
    registry.metadata("b3")
  with pytest.raises(SegjaxError, match="unknown widget None"):
    registry.lookup(None)
  with pytest.raises(ValueError, match="widget 'b2' is registered twice"):
    registry["b2"] = lambda: 3
  with pytest.raises(ValueError, match="widget 'b10' is registered twice"):
    registry.register("b10")(lambda: 0)
  del registry["b2"]
  assert "b2" not in registry and len(registry) == 1
  registry["b2"] = lambda: 4  # a removed name can be registered again
  assert registry.lookup("b2")() == 4


@pytest.mark.parametrize(
  "registry, kind, key",
  [
    (models.MODELS, "model", "model.name"),
    (DATASETS, "dataset", "data.name"),
    (LOSSES, "loss", "loss"),
    (EVALUATORS, "evaluator", "evaluators"),
    (AUGMENTATIONS, "augmentation", "augment.ops"),
    (OPTIMIZERS, "optimizer", "optimizer.name"),
    (SCHEDULES, "schedule", "optimizer.schedule"),
  ],
)
def test_every_registry_of_segjax_is_a_registry_with_its_config_key(registry, kind, key):
  assert isinstance(registry, Registry)
  assert (registry.kind, registry.config_key) == (kind, key)
  with pytest.raises(SegjaxError) as error:
    registry.lookup("no_such_name")
  message = str(error.value)
  assert "\n" not in message and f"(config key {key})" in message
  assert all(name in message for name in registry)


def test_metadata_replaces_the_side_tables():
  assert LOSSES.where(lambda meta: meta.get("one_logit", False)) == ("sigmoid_cross_entropy", "sigmoid_dice_loss")
  assert model_outputs("sigmoid_dice_loss", 2) == 1 and model_outputs("focal_loss", 2) == 2
  assert AUGMENTATIONS.where(lambda meta: "coordinates" in meta) == ("scale_crop", "rotate", "elastic")
  assert evaluator_keys(["isbi"]) == ("mask",) and evaluator_keys(["isbi", "instances"]) == ("mask", "instances")
  assert evaluator_keys([]) == ()
  with pytest.raises(SegjaxError, match="evaluator 'instances' needs a dataset with instance maps"):
    check_evaluators(["isbi", "instances"], has_instances=False)


def test_an_evaluator_registered_with_metadata_declares_what_it_reads(monkeypatch):
  registry = EVALUATORS.copy()
  assert dict(registry.metadata("instances")) == dict(EVALUATORS.metadata("instances"))
  monkeypatch.setattr("segjax.train.evaluators.EVALUATORS", registry)
  registry.register("count_objects", lambda prediction, info: {}, reads=("instances",))
  registry["plain"] = lambda prediction, info: {}
  assert evaluator_keys(["count_objects", "plain"]) == ("instances", "mask")
  with pytest.raises(SegjaxError, match="evaluator 'count_objects' needs a dataset with instance maps"):
    check_evaluators(["plain", "count_objects"], has_instances=False)


def test_models_have_one_constructor_name():
  assert models.create is models.get_model
  assert models.get_model("unet_small", num_classes=3).num_classes == 3


def test_import_modules_names_the_module_that_cannot_be_imported():
  import_modules(["json"])
  with pytest.raises(SegjaxError, match="cannot import module 'no_such_module_xyz' \\(config key imports\\)"):
    import_modules(["no_such_module_xyz"])


def test_a_model_class_states_its_own_geometry():
  import flax.linen as nn

  from segjax.models.geometry import Geometry, model_geometry

  class Cropping(nn.Module):
    depth: int = 2

    @nn.nowrap
    def geometry(self, multiple: int = 1) -> Geometry:
      return Geometry(margin=3, fit=lambda n: n + n % 2, align=4)

    @nn.compact
    def __call__(self, x, *, train: bool):
      return x[:, 3:-3, 3:-3]

  geometry = model_geometry(Cropping(), multiple=16)
  assert (geometry.margin, geometry.input_size_for_output(9), geometry.align) == (3, 16, 4)  # 9 + 6 = 15 -> 16
  unet = model_geometry(models.get_model("unet", num_classes=2, depth=3), multiple=16)
  assert (unet.margin, unet.input_size_for_output(100), unet.align) == (0, 112, 8)
  valid = model_geometry(models.get_model("unet_valid", num_classes=2), multiple=16)
  assert (valid.margin, valid.input_size_for_output(388), valid.align) == (92, 572, 16)


def test_an_ensemble_of_runs_of_other_data_is_refused():
  from types import SimpleNamespace

  from segjax.inference import Ensemble

  two, three = SimpleNamespace(num_classes=2, num_channels=1), SimpleNamespace(num_classes=3, num_channels=1)
  with pytest.raises(SegjaxError, match="workdir runs/b predicts 3 classes from 1 channels, the first 2 from 1"):
    Ensemble([two, three], names=["runs/a", "runs/b"])
  with pytest.raises(SegjaxError, match="an ensemble needs at least one trained workdir"):
    Ensemble([])
