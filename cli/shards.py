"""`tailforge shards verify`."""

from __future__ import annotations

import argparse

from tailforge.gen.data.shards.verify import verify_shard_set


def run_verify(args: argparse.Namespace) -> int:
    import sys

    from tailforge.cli.util import print_json
    from tailforge.gen.core.files import write_json_atomic

    report = verify_shard_set(args.root)
    if args.json:
        write_json_atomic(args.json, report)
    print_json(report)
    if not report["ok"]:
        print(f"tailforge shards verify: {len(report['problems'])} problem(s) in {args.root}; first: "
              f"{report['problems'][0]}", file=sys.stderr)
    return 0 if report["ok"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    """`tailforge shards ...` (registered by cli/gen.py)."""
    from tailforge.cli.util import add_command, add_group

    group = add_group(sub, "shards", "inspect and check WebDataset shard sets")
    verify = add_command(
        group, "verify", "check every shard of a set against its records and manifest", run_verify,
        description="Read every shard the manifest lists (a folder or any fsspec URL, e.g. s3://bucket/set) and "
                    "check its tar structure and member names, its sample count, its sha256 against the manifest "
                    "and its record, that keys are unique across the set and match each record's range, and that "
                    "the set holds what the job planned. Prints a JSON report; exit status 0 when the set is "
                    "whole, 1 when a problem was found (each problem names the shard and byte offset).")
    verify.add_argument("root", metavar="DIR", help="shard set folder or URL (holding _info.json)")
    verify.add_argument("--json", default=None, help="also write the report to this file")
