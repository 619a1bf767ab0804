"""`python -m ato.generate [--check]`: rewrite the generated files, or (--check) list the stale ones
and exit 1."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ato.artifacts import write_text_atomic

from . import ROOT, generated_files

log = logging.getLogger("ato.generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ato.generate", description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = generated_files(args.root)
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        if args.check:
            log.error("%s is stale: run `python -m ato.generate`", path.relative_to(args.root))
        else:
            write_text_atomic(path, wanted[path])
            log.info("wrote %s", path.relative_to(args.root))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
