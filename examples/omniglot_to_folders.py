"""Omniglot as class folders for task=image_folder, split into train / val / test as task=omniglot splits it.

    python examples/omniglot_to_folders.py DIR OUT     # DIR: task=omniglot's data.root (it holds omniglot-py/)

writes OUT/{train,val,test}/<id>_<alphabet>_<character>/*.png (the PNGs copied unchanged). Then

    python -m dif_maml_dist.train task=image_folder data.root=OUT task.invert=true task.standardise=false \\
        task.rotations=true task.q_query=1 task.meta_batch=16 runtime.eval_chunk=8

trains on the same episodes, pixel for pixel, as `task=omniglot_5w1s data.root=DIR runtime.eval_chunk=8`: the ink
inverted to bright on dark and pixels left on [0, 1] as task=omniglot decodes them. <id> is the character's number
in task=omniglot, zero-padded, so that the folders sort in its order (image_folder numbers the classes in sorted
folder order, and a seed draws classes by number). --split, --split-seed and --val-alphabets are task=omniglot's
task.split, task.split_seed and task.val_alphabets.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from dif_maml_dist.config import SPLITS, TaskConfig
from dif_maml_dist.tasks.omniglot import character_folders, character_split


def export(root: Path, out: Path, task: TaskConfig) -> dict[str, int]:
    """Copy every character's PNGs into ``out/<split>/<id>_<alphabet>_<character>/``; the characters per split."""
    folders = character_folders(root)
    split = character_split([alphabet for alphabet, _ in folders], task)
    width = len(str(len(folders) - 1))
    for part, ids in split.items():
        for c in ids:
            alphabet, folder = folders[c]
            dest = out / part / f"{c:0{width}d}_{alphabet.partition('/')[2]}_{folder.name}"
            dest.mkdir(parents=True)
            for png in sorted(folder.glob("*.png")):
                shutil.copy2(png, dest / png.name)
    return {part: len(ids) for part, ids in split.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the folder holding omniglot-py/ (task=omniglot's data.root)")
    ap.add_argument("out", type=Path, help="where to write train/, val/ and test/ (a new or empty folder)")
    ap.add_argument("--split", choices=SPLITS, default="random")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--val-alphabets", type=int, default=5)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} is not empty; give a new folder")
    try:
        counts = export(args.root, args.out,
                        TaskConfig(split=args.split, split_seed=args.split_seed, val_alphabets=args.val_alphabets))
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(", ".join(f"{part}: {n} characters" for part, n in counts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
