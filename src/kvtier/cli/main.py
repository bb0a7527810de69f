"""The `kvtier` command: demo, replay, inspect."""

from __future__ import annotations

import argparse
import logging
import sys

from kvtier.errors import KvtierError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV block manager for "
                                     "LLM inference: host RAM, local disk and remote tiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from kvtier.cli import demo, inspect, replay

    demo.build_parser(sub)
    replay.add_parser(sub)
    inspect.build_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KvtierError as exc:
        print(f"kvtier: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
