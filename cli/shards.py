"""`tailforge shards verify`."""

from __future__ import annotations

import argparse
import sys

from tailforge.cli.commands import Command, add_json_option, print_report


def verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="DIR", help="shard set folder or URL (holding _info.json)")
    add_json_option(parser)


def run_verify(args: argparse.Namespace) -> int:
    """Read every shard the manifest lists (a folder or any fsspec URL, e.g. s3://bucket/set) and check its tar
    structure and member names, its sample count, its sha256 against the manifest and its record, that keys are
    unique across the set and match each record's range, and that the set holds what the job planned. Prints a
    JSON report; exit status 0 when the set is whole, 1 when a problem was found (each problem names the shard
    and byte offset)."""

    from tailforge.gen.data.shards.verify import verify_shard_set

    report = verify_shard_set(args.root)
    print_report(report, args.json)
    if not report["ok"]:
        print(f"tailforge shards verify: {len(report['problems'])} problem(s) in {args.root}; first: "
              f"{report['problems'][0]}", file=sys.stderr)
    return 0 if report["ok"] else 1


SUMMARY = "inspect and check WebDataset shard sets"

COMMANDS = [
    Command(
        "verify", "check every shard of a set against its records and manifest", run=run_verify,
        options=verify_options),
]
