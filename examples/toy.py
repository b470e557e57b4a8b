"""The examples' --toy mode: a tiny diffusion model trained for a few seconds on scikit-learn's digits.

It learns little (20 optimizer steps), which is all the examples need to run end to end on a CPU;
pass a real model folder (``tailforge train diffusion``) instead for meaningful results.
"""

from __future__ import annotations

from pathlib import Path

import tailforge

#: digits' 8x8 training images the toy model and the examples use (of 1,437)
TOY_IMAGES = 128


def toy_diffusion_model(out: str | Path, *, unconditional: bool = False) -> str:
    """Train (or reuse, if `out` already holds it) a tiny 8x8 digits model; returns its folder."""
    config = tailforge.DiffusionTrainConfig(dataset=f"digits?n={TOY_IMAGES}", steps=20, batch_size=32,
                                            warmup_steps=5, checkpoint_every=20,
                                            class_conditional=not unconditional)
    return str(tailforge.train_diffusion(config, out, progress=False))
