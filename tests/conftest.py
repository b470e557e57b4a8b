"""Shared fixtures: one small local Ray instance per test session, and a tiny model folder."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 2 CPUs shared by every test that needs actors."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained (random-weight) class-conditional 8x8 model folder: enough for shape, I/O and
    determinism tests without spending minutes on training."""
    from tailforge.gen.checkpoint import ModelMeta, save_diffusion_model
    from tailforge.gen.unet import build_unet
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    unet = build_unet("tiny", image_size=8, channels=1, num_classes=10)
    save_diffusion_model(folder, unet, DDPMScheduler(num_train_timesteps=1000),
                         ModelMeta(image_size=8, channels=1, num_classes=10, class_names=tuple("0123456789"),
                                   dataset="digits"))
    return folder
