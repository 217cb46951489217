"""The network's figures of a run whose agents may have left (``runtime.on_peer_failure=continue``), read off
the run directory: ``python -m dif_maml_dist.summarize RUN_DIR`` (also ``dif-maml-summarize``).

The agent that finishes last writes them itself (``run/summary.py``); run this by hand when that never happened
(an agent died unseen, after all its neighbours had finished): it summarises whatever is there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from dif_maml_dist.run.summary import context_of, exclusive, write


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="dif-maml-summarize", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not (args.run_dir / "agents").is_dir():
            raise ValueError(f"{args.run_dir} holds no agents/ folder: summarize reads runs made with "
                             f"runtime.on_peer_failure=continue (other runs write their summary themselves)")
        ctx = context_of(args.run_dir)
        with exclusive(args.run_dir):
            summary = write(ctx, "dif_maml_dist.summarize")
    except ValueError as err:
        print(f"dif-maml-summarize: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{len(summary['survivors'])} survivors, departed {[d['agent'] for d in summary['departed']]}, "
          f"components {summary['components']}: {args.run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
