"""Write a params profile over params.yaml: `python scripts/apply_profile.py params/quick.yaml [params.yaml]`.

Each key of the profile's sections replaces that key of params.yaml whole (a mapping value such as
`corpus.tokens` is not merged); `pairs` is replaced whole. params.yaml keeps its comments and order
(ruamel round trip, as `dvc exp run -S` edits it). Called by `scripts/repro.sh --profile NAME`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ruamel.yaml import YAML


def apply_profile(profile: Path, params: Path) -> list[str]:
    """Rewrite `params` with `profile`'s values; returns the dotted keys written."""
    yaml = YAML()  # round trip: comments, order and flow style (of both files) survive
    yaml.width = 4096  # never wrap a long commented line
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    target = yaml.load(params.read_text())
    override = yaml.load(profile.read_text()) or {}
    written = []
    for section, values in override.items():
        if section not in target:
            raise SystemExit(f"{profile}: section {section!r} is not in {params}")
        if section == "pairs" or not isinstance(values, dict):
            target[section] = values
            written.append(section)
            continue
        for key, value in values.items():
            if key not in target[section]:
                raise SystemExit(f"{profile}: {section}.{key} is not a key of {params}")
            target[section][key] = value
            written.append(f"{section}.{key}")
    with params.open("w") as fh:
        yaml.dump(target, fh)
    return written


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    keys = apply_profile(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) == 3 else "params.yaml"))
    print(f"{sys.argv[1]}: {len(keys)} keys written over params.yaml: {', '.join(keys)}", file=sys.stderr)
