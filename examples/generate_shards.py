"""Generate WebDataset shards from Python: plain sampling, and reconstruction to t_re
(Yamaguchi & Fukuda 2023), in this process (actors=0, no Ray) or on a Ray actor pool.

    python examples/generate_shards.py --toy --out /tmp/shards       # seconds on a CPU
    python examples/generate_shards.py --model runs/digits --out runs/gen --num 5000 --actors 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from toy import toy_diffusion_model

import tailforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="class-conditional diffusion model folder (ours or a diffusers UNet2DModel)")
    parser.add_argument("--toy", action="store_true", help="train a tiny model first and sample few steps (seconds)")
    parser.add_argument("--out", required=True, help="folder for the shard sets")
    parser.add_argument("--num", type=int, default=1000, help="samples to generate")
    parser.add_argument("--actors", type=int, default=0, help="Ray actors (0: in this process, without Ray)")
    args = parser.parse_args()
    if not (args.toy or args.model):
        parser.error("give --model DIR or --toy")
    out = Path(args.out)
    model_dir = args.model or toy_diffusion_model(out / "toy_model")
    steps = 5 if args.toy else 250
    num = 40 if args.toy else args.num

    # a batch in memory: uint8 NCHW, sample i of class i mod 10, its noise from (seed, i)
    images = tailforge.sample(model_dir, 10, seed=0, steps=steps)
    print(f"sampled a batch of {tuple(images.shape)} {images.dtype}")

    # the same samples as shards (sample i here is sample i above): `tailforge gen baseline`
    baseline = tailforge.BaselineConfig(model=model_dir, num=num, shard_size=max(num // 4, 1), seed=0,
                                        sampling=tailforge.SamplingConfig(steps=steps))
    result = tailforge.generate(baseline, out / "baseline", actors=args.actors)
    print(f"baseline: {result.samples} samples in {len(result.records)} shards, {result.seconds:.1f} s")

    # reconstructions of the real training images from t_re = 0.3 of T: `tailforge gen reconstruct`
    reconstruct = tailforge.ReconstructConfig(model=model_dir, dataset="digits?n=40" if args.toy else "digits",
                                              t_re=0.3, job="reconstruct_t_re_0p3",
                                              sampling=tailforge.SamplingConfig(steps=steps))
    result = tailforge.generate(reconstruct, out / "t_re_0p3", actors=args.actors)
    print(f"reconstruct t_re=0.3: {result.samples} samples in {len(result.records)} shards")


if __name__ == "__main__":
    main()
