"""Classifier training on in-memory data (the reference classifiers used to check samples)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..gen.checkpoint import config_dict
from ..gen.classifier_nets import create_classifier, predict_logits, save_classifier
from ..gen.datasets import LabeledImages, load_dataset
from ..gen.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """`tailforge train classifier`; copied into the classifier's config."""

    dataset: str = "digits"  # dataset spec: train split for training, test split for the log
    model: str = "tinycnn"  # any timm model name
    epochs: int = 30  # passes over the training split
    batch_size: int = 128  # images per step
    lr: float = 3e-3  # AdamW peak learning rate (cosine decay to 0)
    weight_decay: float = 5e-4  # AdamW weight decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # initialisation and data order

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def fit_classifier(config: ClassifierTrainConfig, train: LabeledImages, test: LabeledImages | None = None, *,
                   device: str | None = None, progress: bool = True, log_path: Path | None = None) -> nn.Module:
    """Train `config.model` with AdamW and a cosine schedule; logs per-epoch loss (and test accuracy)."""
    config.validate()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    model = create_classifier(config.model, num_classes=train.info.num_classes, in_chans=train.info.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                   pct_start=0.15, anneal_strategy="cos")
    images, labels = train.float_images(), train.labels
    order_gen = torch.Generator().manual_seed(config.seed)
    log = log_path.open("a") if log_path else None
    started = time.perf_counter()
    for epoch in tqdm(range(config.epochs), desc=f"train {config.model}", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(len(train), generator=order_gen)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            logits = model(images[index].to(device))
            loss = F.cross_entropy(logits, labels[index].to(device), label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        entry = {"epoch": epoch + 1, "train_loss": total / len(train), "seconds": round(time.perf_counter() - started, 2)}
        if test is not None:
            entry["test_accuracy"] = float((predict_logits(model, test.images).argmax(1) == test.labels).float().mean())
        if log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
    if log:
        log.close()
    return model.eval()


def train_classifier(config: ClassifierTrainConfig, out: str | Path, *, device: str | None = None,
                     progress: bool = True) -> tuple[nn.Module, float]:
    """Train on the dataset's train split, save to `out`, return (model, test accuracy)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset(config.dataset, "train")
    test = load_dataset(config.dataset, "test")
    model = fit_classifier(config, train, test, device=device, progress=progress, log_path=out / "train_log.jsonl")
    accuracy = float((predict_logits(model, test.images).argmax(1) == test.labels).float().mean())
    save_classifier(out, model, {"model": config.model, "num_classes": train.info.num_classes,
                                 "in_chans": train.info.channels, "image_size": train.info.image_size,
                                 "class_names": list(train.info.class_names), "train_config": config_dict(config),
                                 "test_accuracy": accuracy})
    return model, accuracy
