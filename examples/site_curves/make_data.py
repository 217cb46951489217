"""Example data for site_curves.py: OUT/site0 .. OUT/site{N-1}, each with its own devices' curves, and OUT/test.

    python examples/site_curves/make_data.py sites --sites 4

A device's curve is y = a sin(x - b) with its own amplitude and phase; each site's devices have amplitudes from
a range of their own (sites differ, as hospitals or plants do).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path


def write_curve(path: Path, amplitude: float, phase: float, rows: int, rng: random.Random) -> None:
    lines = ["x,y"]
    for _ in range(rows):
        x = rng.uniform(-5, 5)
        lines.append(f"{x:.6f},{amplitude * math.sin(x - phase):.6f}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--devices", type=int, default=12, help="curves per site")
    ap.add_argument("--rows", type=int, default=40, help="points per curve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for site in range(args.sites):
        folder = args.out / f"site{site}"
        folder.mkdir(parents=True, exist_ok=False)
        low = 0.1 + 4.9 * site / args.sites
        for d in range(args.devices):
            write_curve(folder / f"device{d:03d}.csv", rng.uniform(low, low + 4.9 / args.sites),
                        rng.uniform(0, math.pi), args.rows, rng)
    (args.out / "test").mkdir(parents=True, exist_ok=False)
    for d in range(args.devices):
        write_curve(args.out / "test" / f"device{d:03d}.csv", rng.uniform(0.1, 5.0), rng.uniform(0, math.pi),
                    args.rows, rng)


if __name__ == "__main__":
    main()
