"""``python -m nnk {demo,nc,info} ...``: the package's command line."""
from __future__ import annotations

import json
import sys

USAGE = """usage: python -m nnk COMMAND [ARGS]

commands:
  demo   train a small network with a linear and a cosine head and compare them
         (python -m nnk demo --help)
  nc     neural-collapse metrics of saved features (python -m nnk nc --help)
  info   how nnk and its extension were built
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "nc":
        from .nc.cli import main as nc_main

        return nc_main(rest)
    if cmd == "info":
        import nnk

        print(json.dumps({"nnk": nnk.__version__, **nnk.ops.build_info()}, indent=2))
        return 0
    print(f"unknown command {cmd!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
