"""Classifier networks, registered the timm way, and their safetensors checkpoints.

They live in ``gen`` because generation needs them too (the guidance classifier of Sehwag et al. 2022 runs
inside the sampler). Every network exposes timm's interface: ``forward_features`` (a feature map),
``forward_head(x, pre_logits=True)`` (the embedding used for hardness, OOD, density and
memorization features) and ``reset_classifier``; any timm model name works wherever these do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

from tailforge.gen.core.errors import CheckpointError, ConfigError
from tailforge.gen.core.files import load_module_state, read_json, save_module
from tailforge.gen.core.images import uint8_to_float
from tailforge.gen.models.folders import publish_folder, read_published

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
# a classifier folder's own entries (gen/models/folders.py)
CLASSIFIER_ENTRIES = (CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """A four-conv CNN for tiny images (8x8 digits): two 3x3 conv pairs around one 2x2 max-pool,
    global average pooling to a `widths[-1]`-d embedding, then a linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, int] = (32, 64),
                 drop_rate: float = 0.0, **_: Any):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = widths[1]
        self.drop_rate = drop_rate
        self.features = nn.Sequential(
            _conv_bn(in_chans, widths[0]), _conv_bn(widths[0], widths[0]), nn.MaxPool2d(2),
            _conv_bn(widths[0], widths[1]), _conv_bn(widths[1], widths[1]))
        self.fc = nn.Linear(widths[1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.fc(nn.functional.dropout(x, self.drop_rate, self.training))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@register_model
def tinycnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """TinyCNN with a 64-d embedding (the guidance classifier size in DESIGN.md's reference runs)."""
    if pretrained:
        raise ConfigError("tinycnn has no pretrained weights")
    return TinyCNN(**kwargs)


@register_model
def tinycnn_wide(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """A wider TinyCNN (48/96 channels): a different network for independent evaluation features."""
    if pretrained:
        raise ConfigError("tinycnn_wide has no pretrained weights")
    return TinyCNN(widths=(48, 96), **kwargs)


class CifarResNet(ResNet):
    """timm's ResNet with the CIFAR stem of He et al. 2016 (Sec. 4.2): one 3x3 stride-1 conv and no
    max-pool, so a 32x32 image keeps 32x32 through layer1 and ends as a 4x4 map (the ImageNet stem
    would shrink it to 1x1). Everything else, including forward_features / forward_head, is timm's."""

    def __init__(self, *, in_chans: int = 3, stem_width: int = 64, **kwargs: Any):
        super().__init__(in_chans=in_chans, stem_width=stem_width, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        # The stem no longer downsamples: the feature maps are 1, 1, 2, 4, 8 times smaller than the input.
        for info, reduction in zip(self.feature_info, (1, 1, 2, 4, 8)):
            info["reduction"] = reduction


# timm picks up this module-level dict in register_model (pretrained_cfg: input size, first conv, head).
default_cfgs = {
    "resnet18_cifar": {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4),
                       "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                       "first_conv": "conv1", "classifier": "fc"},
}


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2, 11.2M parameters) with the CIFAR stem, for 32x32 images."""
    if pretrained:
        raise ConfigError("resnet18_cifar has no pretrained weights")
    return build_model_with_cfg(CifarResNet, "resnet18_cifar", False, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


def create_classifier(name: str, *, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    """Any timm model by name (never pretrained: nothing is downloaded)."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown classifier {name!r}: not a timm model name (ours: tinycnn, tinycnn_wide, resnet18_cifar)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def write_classifier(folder: str | os.PathLike, model: nn.Module, config: dict[str, Any]) -> None:
    """Weights as safetensors plus a JSON config that must hold the model name, num_classes and
    in_chans (so the loader can rebuild the network), and whatever else describes the run; plain
    files, for folders that are published whole (checkpoints, guidance folders)."""
    missing = [k for k in ("model", "num_classes", "in_chans") if k not in config]
    if missing:
        raise ConfigError(f"classifier config lacks {missing}")
    save_module(model, folder, config, weights_name=CLASSIFIER_WEIGHTS, config_name=CLASSIFIER_CONFIG)


def save_classifier(folder: str | os.PathLike, model: nn.Module, config: dict[str, Any]) -> None:
    """:func:`write_classifier` published as one version (gen/models/folders.py): the folder is
    also the training run's folder (checkpoints/, train_log.jsonl), so it cannot be swapped by
    one rename; weights and config are written and fsynced into a new version folder that one
    rename of the pointer makes current, so they never disagree and a crash midway leaves the
    previous classifier loadable."""
    publish_folder(folder, CLASSIFIER_ENTRIES, lambda version: write_classifier(version, model, config))


def load_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved classifier (eval mode) and return it with its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"classifier folder does not exist: {folder}")
    return read_published(folder, CLASSIFIER_ENTRIES[0], lambda version: _load_version(version, device))


def _load_version(folder: Path, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    config = read_json(folder / CLASSIFIER_CONFIG, "classifier config")
    try:
        model = create_classifier(config["model"], num_classes=int(config["num_classes"]),
                                  in_chans=int(config["in_chans"]), **config.get("model_kwargs", {}))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / CLASSIFIER_CONFIG} does not describe a classifier: {err}") from err
    load_module_state(model, folder / CLASSIFIER_WEIGHTS)
    return model.to(device).eval(), config


def _batched(model: nn.Module, images: Tensor, batch_size: int, head) -> Tensor:
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            batch = uint8_to_float(batch) if batch.dtype == torch.uint8 else batch
            outputs.append(head(batch.to(device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Logits for uint8 (or [-1, 1] float) NCHW images, in eval mode, batched, returned on the CPU."""
    return _batched(model, images, batch_size, model)


def embed(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """The classifier's own embedding (timm's ``forward_head(forward_features(x), pre_logits=True)``),
    the feature space for hardness, density, OOD and memorization measurements."""
    return _batched(model, images, batch_size, lambda x: model.forward_head(model.forward_features(x), pre_logits=True))
