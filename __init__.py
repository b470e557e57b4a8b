"""tailforge: diffusion data generation and augmentation for classifier training.

The Python API (docs/api.md has runnable examples). ``import tailforge`` is instant: each name
below is imported on first use, so neither torch nor Ray is loaded until one is needed.

Models and sampling
    load_diffusion_model(path, device)   a model folder (ours or a diffusers UNet2DModel folder)
    sample(model, n, seed=, steps=, ...)  a batch of generated images, uint8 NCHW
    SamplingConfig                        sampler, steps, eta, clipping
DiffAug (Sastry et al. 2023) in any training loop
    DiffAug(model, value_range=)          nn.Module: images -> one-step denoised augmentations
    diffaug_ensemble(classifier, model)   nn.Module: DiffAug-Ensemble's averaged log-probabilities
Shard sets
    open_shards(sources, batch_size=)     the trainer's IterableDataset: mixing, epochs, DDP splitting
    write_real_shards(dataset, root)      a dataset's training split as a shard set
    generate(config, out, actors=0)       a generation job in this process (actors=0) or on Ray
    BaselineConfig, LowDensityConfig, ReconstructConfig, GuidanceConfig
                                          plain sampling, low-density sampling (Sehwag et al. 2022),
                                          reconstruction (Yamaguchi & Fukuda 2023)
Training
    train_diffusion(config, out), DiffusionTrainConfig
    train_classifier(config, out), ClassifierTrainConfig, load_classifier(folder)
Evaluation (frozen dataclasses with intervals and item counts)
    evaluate_accuracy(classifier, images, labels) -> AccuracyResult
    evaluate_entropy(classifier, images, labels)  -> EntropyResult
    evaluate_memorization(generated, train)       -> MemorizationResult  (Yoon et al. 2023; Gu et al. 2023)
"""

__version__ = "0.1.0"

#: Every public name -> "module:attribute" where it lives; the only place a moved object is re-pointed.
_API = {
    "load_diffusion_model": "tailforge.gen.models.diffusion:load_diffusion_model",
    "DiffusionModel": "tailforge.gen.models.diffusion:DiffusionModel",
    "sample": "tailforge.api:sample",
    "SamplingConfig": "tailforge.gen.diffusion.config:SamplingConfig",
    "DiffAug": "tailforge.api:DiffAug",
    "diffaug_ensemble": "tailforge.api:diffaug_ensemble",
    "open_shards": "tailforge.api:open_shards",
    "MixedStream": "tailforge.train.streams:MixedStream",
    "generate": "tailforge.api:generate",
    "GenerationResult": "tailforge.api:GenerationResult",
    "BaselineConfig": "tailforge.gen.jobs.config:BaselineConfig",
    "LowDensityConfig": "tailforge.gen.jobs.config:LowDensityConfig",
    "ReconstructConfig": "tailforge.gen.jobs.config:ReconstructConfig",
    "GuidanceConfig": "tailforge.gen.methods.config:GuidanceConfig",
    "write_real_shards": "tailforge.train.streams:write_real_shards",
    "train_diffusion": "tailforge.train.diffusion:train_diffusion",
    "DiffusionTrainConfig": "tailforge.train.config:DiffusionTrainConfig",
    "train_classifier": "tailforge.train.classifier:train_classifier",
    "ClassifierTrainConfig": "tailforge.train.config:ClassifierTrainConfig",
    "load_classifier": "tailforge.gen.models.classifiers:load_classifier",
    "evaluate_accuracy": "tailforge.api:evaluate_accuracy",
    "AccuracyResult": "tailforge.api:AccuracyResult",
    "evaluate_entropy": "tailforge.api:evaluate_entropy",
    "EntropyResult": "tailforge.api:EntropyResult",
    "evaluate_memorization": "tailforge.api:evaluate_memorization",
    "MemorizationResult": "tailforge.api:MemorizationResult",
    "Interval": "tailforge.eval.stats:Interval",
}

__all__ = list(_API)


def __getattr__(name: str):
    """PEP 562: import a public name's module on first access (and cache the object here)."""
    target = _API.get(name)
    if target is None:  # also how `from tailforge import gen` falls back to importing the subpackage
        raise AttributeError(f"module 'tailforge' has no attribute {name!r}")
    import importlib

    module, attribute = target.split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
