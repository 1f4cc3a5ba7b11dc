"""Regenerate the method tables in README.md and docs/ from the registries.

    python scripts/gen_docs.py          # rewrite the blocks between <!-- registry:NAME --> markers
    python scripts/gen_docs.py --check  # exit 1 if a committed table is stale (the tests do this too)
"""

import argparse
import sys

from weightlab.lab.docs import FILES, ROOT, sync

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    stale = {f: sync(ROOT / f, check=a.check) for f in FILES}
    for f, names in stale.items():
        if names:
            print(f"{f}: {'stale' if a.check else 'updated'} {', '.join(names)}")
    sys.exit(1 if a.check and any(stale.values()) else 0)
