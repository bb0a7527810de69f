"""`kvtier inspect DIR`: what a disk tier holds, read-only (safe while an engine runs)."""

from __future__ import annotations

import argparse
import collections
import json
import os

from kvtier.storage.disk import DATA_NAME, JOURNAL_NAME, _parse_journal


def build_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what a disk tier directory holds")
    p.add_argument("disk_dir", help="the disk_dir of a kvtier config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def describe(directory: str) -> list[dict]:
    """One entry per tier directory under ``directory`` (``rankN/`` or itself)."""
    candidates = [directory] + [os.path.join(directory, d) for d in sorted(os.listdir(directory))
                                if os.path.isdir(os.path.join(directory, d))]
    tiers = []
    for path in candidates:
        journal = os.path.join(path, JOURNAL_NAME)
        if not os.path.exists(journal):
            continue
        with open(journal, "rb") as f:
            state = _parse_journal(f.read())
        data = os.path.join(path, DATA_NAME)
        entry = {"dir": path, "data_bytes": os.path.getsize(data) if os.path.exists(data) else 0}
        if state is None:
            entry["error"] = "journal has no valid superblock"
        else:
            per_fp = collections.Counter(fp for fp, _ in state.entries.values())
            entry.update(slot_bytes=state.slot_bytes, num_slots=state.num_slots,
                         blocks=len(state.entries), torn_tail=state.torn,
                         blocks_by_geometry={f"{fp:#018x}": n for fp, n in per_fp.items()})
        tiers.append(entry)
    return tiers


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.disk_dir):
        print(f"kvtier inspect: {args.disk_dir} is not a directory")
        return 2
    tiers = describe(args.disk_dir)
    if args.json:
        print(json.dumps(tiers))
        return 0
    if not tiers:
        print(f"no kvtier disk tier under {args.disk_dir}")
        return 1
    for t in tiers:
        print(t["dir"])
        if "error" in t:
            print(f"  {t['error']}")
            continue
        print(f"  {t['blocks']} blocks stored of {t['num_slots']} slots "
              f"({t['slot_bytes']} bytes each, {t['data_bytes'] / 1e9:.2f} GB file)")
        for fp, n in t["blocks_by_geometry"].items():
            print(f"  geometry {fp}: {n} blocks")
        if t["torn_tail"]:
            print("  journal tail torn (a crash mid-append); those records are ignored")
    return 0
