"""Example images for task=image_folder with each site's own classes (README "Your own problem"):
OUT/site0 .. OUT/site{N-1}, each with ``train/<class>/*.png`` and ``test/<class>/*.png`` of classes no other site
has, and OUT/test, test classes of their own for runs that share a test folder (data.test_root).

    python examples/image_sites/make_images.py sites --sites 6

A class is a random pattern of strokes; its images are that pattern shifted by a pixel or two, with noise (as
drawings of one character by different hands). Dark strokes on white, as scans and drawing apps give them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_class(folder: Path, images: int, size: int, rng: np.random.Generator) -> None:
    pattern = np.zeros((size, size))
    for _ in range(3):  # three strokes: a row, a column or a diagonal segment each
        r, c, n = rng.integers(2, size - 2), rng.integers(2, size - 2), rng.integers(size // 3, size // 2)
        kind = rng.integers(3)
        for i in range(n):
            y, x = (r, (c + i) % size) if kind == 0 else ((r + i) % size, c) if kind == 1 else ((r + i) % size,
                                                                                                   (c + i) % size)
            pattern[y, x] = 1.0
    folder.mkdir(parents=True)
    for i in range(images):
        shifted = np.roll(pattern, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        ink = np.clip(shifted + rng.normal(0, 0.15, shifted.shape), 0, 1)
        Image.fromarray((255 * (1 - ink)).astype(np.uint8), "L").save(folder / f"{i:02d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sites", type=int, default=6)
    ap.add_argument("--classes", type=int, default=8, help="training classes per site")
    ap.add_argument("--test-classes", type=int, default=5, help="held-out classes per site, and in OUT/test")
    ap.add_argument("--images", type=int, default=10, help="images per class")
    ap.add_argument("--size", type=int, default=20, help="image width and height in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for site in range(args.sites):
        for split, n in (("train", args.classes), ("test", args.test_classes)):
            for c in range(n):
                write_class(args.out / f"site{site}" / split / f"s{site}_{split}{c:02d}", args.images, args.size, rng)
    for c in range(args.test_classes):
        write_class(args.out / "test" / f"shared{c:02d}", args.images, args.size, rng)


if __name__ == "__main__":
    main()
