"""PyTorch reference models for equivalence tests and benchmarks (torch is a test/benchmark extra, never needed by
segjax itself): a torchvision-layout ResNet and a U-Net built like segjax's ``unet`` / ``unet_valid``."""

from typing import Any


def torchvision_layout_resnet(torch: Any, bottleneck: bool, layers: tuple[int, ...], num_classes: int, seed: int):
  """A torchvision-layout ResNet with random weights and random BN running statistics, in eval mode."""
  tnn = torch.nn

  class Basic(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.relu = tnn.ReLU(inplace=True)
      self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      y = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(y)) + identity)

  class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.relu = tnn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.relu(self.bn2(self.conv2(y)))
      return self.relu(self.bn3(self.conv3(y)) + identity)

  block = Bottleneck if bottleneck else Basic

  class TorchResNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.inplanes = 64
      self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.relu = tnn.ReLU(inplace=True)
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      self.layer1 = self._make_layer(64, layers[0], 1)
      self.layer2 = self._make_layer(128, layers[1], 2)
      self.layer3 = self._make_layer(256, layers[2], 2)
      self.layer4 = self._make_layer(512, layers[3], 2)
      self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
      self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          tnn.BatchNorm2d(planes * block.expansion),
        )
      stage = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      stage += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
      return tnn.Sequential(*stage)

    def features(self, x):
      x = self.relu(self.bn1(self.conv1(x)))
      out = [x]
      x = self.maxpool(x)
      for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
        x = stage(x)
        out.append(x)
      return out

    def forward(self, x):
      x = self.features(x)[-1]
      return self.fc(torch.flatten(self.avgpool(x), 1))

  torch.manual_seed(seed)
  model = TorchResNet()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, tnn.BatchNorm2d):  # non-trivial eval-mode BN
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model.eval()


def torch_unet(torch: Any, *, depth: int, width: int, in_channels: int, num_classes: int, valid: bool, norm: bool):
  """A U-Net of segjax's ``unet`` (same padding; ``norm``: conv -> BN -> ReLU, convs without bias) or ``unet_valid``
  (unpadded convs with bias, centre-cropped skips) architecture, in training mode."""
  tnn = torch.nn
  pad = 0 if valid else 1

  def double_conv(cin, cout):
    layers = []
    for c in (cin, cout):
      layers.append(tnn.Conv2d(c, cout, 3, padding=pad, bias=not norm))
      if norm:
        layers.append(tnn.BatchNorm2d(cout))
      layers.append(tnn.ReLU(inplace=True))
    return tnn.Sequential(*layers)

  def crop(skip, size):
    top, left = (skip.shape[2] - size[0]) // 2, (skip.shape[3] - size[1]) // 2
    return skip[:, :, top : top + size[0], left : left + size[1]]

  class UNet(tnn.Module):
    def __init__(self):
      super().__init__()
      widths = [width * 2**i for i in range(depth + 1)]
      self.down = tnn.ModuleList(double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth))
      self.bottleneck = double_conv(widths[depth - 1], widths[depth])
      self.upsample = tnn.ModuleList(
        tnn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(depth))
      )
      self.up = tnn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
      self.classifier = tnn.Conv2d(width, num_classes, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = tnn.functional.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
        x = upsample(x)
        x = block(torch.cat([x, crop(skip, x.shape[2:])], 1))
      return self.classifier(x)

  return UNet()


def flax_unet_params(torch_model: Any, *, depth: int, width: int) -> dict:
  """The parameters of a :func:`torch_unet` (same padding, ``norm=True``) as segjax ``unet`` params, so both start
  from the same weights: conv kernels (out, in, kh, kw) -> (kh, kw, in, out); BatchNorm weight -> scale; the first conv
  of each expanding level takes segjax's concatenation order (skip, up-sampled) instead of PyTorch's (up-sampled,
  skip); a transposed conv (in, out, 2, 2) -> (2, 2, in, out) flipped in both spatial axes (Flax's ConvTranspose
  does not flip its kernel, PyTorch's transposed convolution, the gradient of a correlation, does)."""
  import numpy as np

  sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
  params: dict = {}

  def kernel(w):
    return np.transpose(w, (2, 3, 1, 0))

  def block(torch_name: str, name: str, skip_channels: int | None = None) -> None:
    params[name] = {}
    for j, (conv, norm) in enumerate(((0, 1), (3, 4))):
      w = sd[f"{torch_name}.{conv}.weight"]
      if j == 0 and skip_channels is not None:
        up = w.shape[1] - skip_channels
        w = np.concatenate([w[:, up:], w[:, :up]], 1)
      params[name][f"conv_{j}"] = {
        "conv": {"kernel": kernel(w)},
        "norm": {"scale": sd[f"{torch_name}.{norm}.weight"], "bias": sd[f"{torch_name}.{norm}.bias"]},
      }

  for i in range(depth):
    block(f"down.{i}", f"down_{i}")
  block("bottleneck", "bottleneck")
  for j in range(depth):
    level = depth - 1 - j
    up = np.transpose(sd[f"upsample.{j}.weight"], (2, 3, 0, 1))[::-1, ::-1]
    params[f"upsample_{level}"] = {"kernel": np.ascontiguousarray(up), "bias": sd[f"upsample.{j}.bias"]}
    block(f"up.{j}", f"up_{level}", skip_channels=width * 2**level)
  params["classifier"] = {"kernel": kernel(sd["classifier.weight"]), "bias": sd["classifier.bias"]}
  return params
