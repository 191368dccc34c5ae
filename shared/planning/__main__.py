"""Print the VRAM plan of a config: `python -m shared.planning CONFIG.toml [--json]`; exit 1 when it does not fit."""

from __future__ import annotations

import argparse
import sys

from shared.config.schema import ConfigError, load_config
from shared.planning.plan import make_plan, render_table


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, plan, print; the exit status says whether the config fits."""
    parser = argparse.ArgumentParser(prog="python -m shared.planning", description=__doc__)
    parser.add_argument("config", help="path to a Lyra TOML config")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(load_config(args.config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else render_table(plan))
    return 0 if plan.ok else 1


if __name__ == "__main__":
    sys.exit(main())
