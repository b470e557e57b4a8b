"""Train a timm model on real and synthetic shards mixed by weight, then score it with timm's own loader.

The mix is tailforge's: ``tailforge.open_shards`` is the PyTorch IterableDataset that
``tailforge train classifier`` reads (weights, resampled epochs, DDP splitting, loader workers).
The model, optimizer and evaluation loader are timm's: our shard sets are plain WebDataset tars
with a timm ``_info.json``, so ``timm.data.create_dataset("wds/", root=...)`` reads them unmodified.

    python examples/timm_mix.py --toy --out /tmp/mix                  # seconds on a CPU
    python examples/timm_mix.py --model runs/digits --out runs/mix --synthetic-weight 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import timm.data
import timm.optim
import torch
from torch import nn
from toy import TOY_IMAGES, toy_diffusion_model

import tailforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="class-conditional diffusion model folder trained on 8x8 digits")
    parser.add_argument("--toy", action="store_true", help="train a tiny model first, few samples and steps (seconds)")
    parser.add_argument("--out", required=True, help="folder for the shard sets")
    parser.add_argument("--synthetic-weight", type=float, default=0.5, help="sampling weight of synthetic vs real 1.0")
    parser.add_argument("--epochs", type=int, default=10, help="epochs over the mix")
    args = parser.parse_args()
    if not (args.toy or args.model):
        parser.error("give --model DIR or --toy")
    out = Path(args.out)
    dataset = f"digits?n={TOY_IMAGES}" if args.toy else "digits"
    model_dir = args.model or toy_diffusion_model(out / "toy_model")
    steps, num, epochs = (5, 64, 1) if args.toy else (250, 5000, args.epochs)

    # shard sets: the real training split, a synthetic set, and held-out real test images for timm
    real = tailforge.write_real_shards(dataset, out / "real")
    tailforge.generate(tailforge.BaselineConfig(model=model_dir, num=num, shard_size=max(num // 4, 1),
                                                sampling=tailforge.SamplingConfig(steps=steps)), out / "synthetic")
    # t_re = 0 copies the images unchanged (Yamaguchi & Fukuda 2023's reconstruction from step 0)
    tailforge.generate(tailforge.ReconstructConfig(model=model_dir, dataset="digits", split="test", t_re=0.0,
                                                   job="test"), out / "test")

    # the trainer's mix as an IterableDataset: batches of uint8 images, labels and source index
    stream = tailforge.open_shards({real: 1.0, out / "synthetic": args.synthetic_weight}, batch_size=64,
                                   epochs=epochs, loader_workers=1, seed=0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen = torch.zeros(2, dtype=torch.long)
    for batch in stream.batches():  # a DataLoader with the stream's loader workers
        x = batch["images"].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        loss = loss_fn(model(x), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += torch.bincount(batch["source"], minlength=2)
    print(f"trained on {int(seen[0])} real and {int(seen[1])} synthetic samples ({len(stream)} steps)")

    # timm's own loader on our shards: mean = std = 0.5 maps [0, 1] to the [-1, 1] the model was trained on
    test = timm.data.create_dataset("wds/", root=str(out / "test"), split="train", input_img_mode="L")
    loader = timm.data.create_loader(test, input_size=(1, 8, 8), batch_size=128, use_prefetcher=False,
                                     mean=(0.5,), std=(0.5,), crop_pct=1.0, num_workers=1, persistent_workers=False)
    images, labels = zip(*loader)
    result = tailforge.evaluate_accuracy(model, torch.cat(images), torch.cat(labels))
    print(f"test top-1 {result.top1.estimate:.3f} (95% CI [{result.top1.low:.3f}, {result.top1.high:.3f}], "
          f"{result.items} images read by timm)")

if __name__ == "__main__":
    main()
