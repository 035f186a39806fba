"""`vit-config FILE [--set key.path=value ...]`: validate a config and print it resolved.

Exit 0 with the resolved JSON on stdout, or 2 with one line per problem on stderr. `--reference` prints the
markdown reference of every field instead (configs/README.md).
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.commands import help_description, reports_user_errors
from pretrain.config.load import load_config
from pretrain.config.reference import render_reference


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-config", description=help_description(__doc__))
    parser.add_argument("config", nargs="?", help="path of the JSON config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one field, e.g. --set optimizer.lr=1e-3 (repeatable; values are JSON or text)",
    )
    parser.add_argument("--reference", action="store_true", help="print the markdown reference of every field")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(render_reference())
        return 0
    if args.config is None:
        parser.error("give a config file, or --reference")
    config = load_config(args.config, args.overrides)
    print(config.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
