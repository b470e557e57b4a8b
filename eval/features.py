"""What the evaluation suites need from a classifier, and how they get it.

Every suite (accuracy, corruptions, OOD, fidelity, memorization's feature-space check) takes a
*classifier-like module*: an ``nn.Module`` mapping float NCHW images in [-1, 1] to logits, which is
what :func:`tailforge.gen.models.classifiers.predict_logits` runs in batches. A timm-style model
additionally exposes ``forward_features`` / ``forward_head(pre_logits=True)`` and a linear head
(``get_classifier()``), which the feature-based OOD scores (ReAct, ASH, SCALE, Mahalanobis, kNN)
and the feature-space metrics need (DESIGN.md: features come from the classifier's own
interface, not from hooks). A wrapper such as DiffAug-Ensemble is a classifier-like module too;
where it exposes no features the feature-based scores are reported as not applicable.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from tailforge.gen.core.device import default_device
from tailforge.gen.models.classifiers import load_classifier


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The final linear layer of a timm-style classifier whose logits are ``head(embedding)``,
    or None when the model does not expose one (then only logit-based scores apply)."""
    if not all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier")):
        return None
    head = model.get_classifier()
    return head if isinstance(head, nn.Linear) else None


def wrap_diffaug_ensemble(classifier: nn.Module, model_dir: str | os.PathLike) -> nn.Module:
    """`classifier` wrapped in DiffAug-Ensemble (Sastry et al. 2023: mean softmax over t in {0, 50, ..., 450})
    with the unconditional diffusion model in `model_dir`, on the classifier's device
    (:func:`tailforge.gen.methods.diffaug.load_diffaug_ensemble`). It returns log-probabilities, so softmax
    of its output is the ensemble's probability and every logit-based metric applies to it."""
    from tailforge.gen.methods.diffaug import load_diffaug_ensemble

    return load_diffaug_ensemble(classifier, str(model_dir))


def load_eval_classifier(folder: str | os.PathLike, *, diffaug_ensemble: str | None = None,
                         device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A saved classifier (optionally wrapped in DiffAug-Ensemble) and a description of it that
    goes into every report: the folder, its config, and the wrapper."""
    device = default_device(device)
    model, config = load_classifier(folder, device)
    described = {"classifier": str(folder), "model": config.get("model"), "diffaug_ensemble": diffaug_ensemble}
    if diffaug_ensemble:
        model = wrap_diffaug_ensemble(model, diffaug_ensemble)
    return model, {**described, "num_classes": int(config["num_classes"])}
