"""DiffAug (Sastry et al. 2023) inside a plain PyTorch training loop, on your own tensors.

The images here are scikit-learn's digits as float tensors in [0, 1] (what torchvision's ToTensor
gives), so DiffAug is built with value_range=(0, 1) and returns augmentations in [0, 1] too. Each
step trains on the clean batch and its DiffAug batch together, as the paper does.

    python examples/diffaug_loop.py --toy                     # seconds on a CPU, a toy model
    python examples/diffaug_loop.py --model runs/uncond --epochs 20
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from toy import TOY_IMAGES, toy_diffusion_model

import tailforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="unconditional diffusion model folder trained on 8x8 digits "
                                        "(tailforge train diffusion --dataset digits --unconditional)")
    parser.add_argument("--toy", action="store_true", help="train a tiny model first and use a subset (seconds)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    args = parser.parse_args()
    if not (args.toy or args.model):
        parser.error("give --model DIR or --toy")

    # your data: float NCHW in [0, 1] and int64 labels
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2, random_state=0)
    if args.toy:
        train_x, train_y, args.epochs = train_x[:TOY_IMAGES], train_y[:TOY_IMAGES], 1
    model_dir = args.model or toy_diffusion_model(tempfile.mkdtemp(prefix="toy_uncond_"), unconditional=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    augment = tailforge.DiffAug(model_dir, value_range=(0, 1), seed=0).to(device)
    classifier = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), 64):
            x, y = train_x[order[start:start + 64]].to(device), train_y[order[start:start + 64]].to(device)
            loss = loss_fn(classifier(x), y) + loss_fn(classifier(augment(x)), y)  # clean + DiffAug
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: last batch loss {loss.item():.3f}")

    result = tailforge.evaluate_accuracy(classifier, test_x, test_y)
    print(f"test top-1 {result.top1.estimate:.3f} (95% CI [{result.top1.low:.3f}, {result.top1.high:.3f}], "
          f"{result.items} images)")


if __name__ == "__main__":
    main()
