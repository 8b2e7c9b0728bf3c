"""``python -m data_tools {convert,verify,info,demo}`` (also installed as ``vitscale-data``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from . import index as index_command
from .plan import Part
from .sources import FORMATS

EXIT_PROBLEMS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    conv = commands.add_parser("convert", help="convert an image dataset into webdataset shards")
    conv.add_argument("source", help="ImageFolder root, folder of <class>.tar files, or a CSV/TSV 'path,label' list")
    conv.add_argument("out", help="shard directory (several splits may share it)")
    conv.add_argument("--split", default="train", help="split name, prefix of the shard files (default train)")
    conv.add_argument("--format", dest="fmt", choices=FORMATS, help="source layout (detected when left out)")
    conv.add_argument("--class-map", help="class list (classes.json, {name: index} JSON, or one name per line); "
                                          "default: OUT/classes.json if present, else sorted class names")
    size = conv.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples per shard")
    size.add_argument("--shard-size", help="source bytes per shard, e.g. 1GB or 500MiB (default 1GB)")
    conv.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    conv.add_argument("--resize-max", type=int, help="re-encode images whose longer side exceeds this many pixels")
    conv.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images (default 95)")
    conv.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    conv.add_argument("--name", help="dataset name in _info.json (default: the source folder's name)")
    parts = conv.add_mutually_exclusive_group()
    parts.add_argument("--part", type=_part, metavar="I/N",
                       help="write only shards i with i %% N == I and no manifest (one of N parallel processes, "
                            "e.g. a SLURM array task); then run the same command with --merge")
    parts.add_argument("--merge", action="store_true",
                       help="after all --part runs: check every shard was written and write the manifest")
    conv.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    check = commands.add_parser("verify", help="re-read every shard: checksums, counts, decoding, labels")
    check.add_argument("out")
    check.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    scope = check.add_mutually_exclusive_group()
    scope.add_argument("--part", type=_part, metavar="I/N",
                       help="check only shards i with i %% N == I (one of N parallel processes, e.g. a SLURM array "
                            "task); keys are then checked for repeats among those shards only: run --merge after")
    scope.add_argument("--merge", action="store_true",
                       help="after all --part runs: keys repeated across shards and the splits' sample counts, "
                            "from the shard indexes (no image is decoded)")

    show = commands.add_parser("info", help="samples per split and class, bytes, image sizes")
    show.add_argument("out")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    index_command.register(commands)

    demo = commands.add_parser("demo", help="write the bundled digits demo dataset and its shards")
    demo.add_argument("out", nargs="?", default="data/demo", help="output folder (default data/demo)")
    return parser


def _part(text: str) -> Part:
    """argparse type for ``--part``: a ``Part``, or a usage error that says what is wrong."""
    try:
        return Part.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (OSError, ValueError, KeyError) as err:  # bad input or state: ConversionError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PROBLEMS


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    summary = convert(args.source, args.out, split=args.split, fmt=args.fmt, class_map=args.class_map,
                      samples_per_shard=args.samples_per_shard, shard_size=args.shard_size, workers=args.workers,
                      resize_max=args.resize_max, quality=args.quality, seed=args.seed, name=args.name,
                      part=args.part, merge=args.merge, progress=not args.no_progress)
    if summary.get("damaged_rewritten"):
        print(f"rewrote {len(summary['damaged_rewritten'])} shards whose size or sha256 no longer matched their "
              f"record: {', '.join(summary['damaged_rewritten'])}")
    if summary.get("shards_lost_to_another_writer"):
        print(f"{summary['shards_lost_to_another_writer']} shards were finished first by another process writing "
              "them at the same time (an overlapping run of this part): kept theirs, deleted ours")
    if summary.get("tar_opens"):
        print(f"read {summary['tars_read']} class tars with {summary['tar_opens']} opens")
    if "part" in summary:
        print(f"{summary['split']} part {summary['part']}: {summary['planned_samples']} planned samples in "
              f"{summary['shards']} shards ({summary['shards_written']} written now), {summary['seconds']:.1f} s; "
              "when every part has finished, run the same command with --merge instead of --part")
        return 0
    print(f"{summary['split']}: {summary['num_samples']} samples in {summary['shards']} shards "
          f"({summary['shards_written']} written now), {summary['skipped']} skipped"
          + (f" (reasons in {summary['errors_file']})" if summary["skipped"] else "")
          + f", {summary['seconds']:.1f} s")
    for reason, count in summary["skipped_reasons"].items():
        print(f"  skipped {count}: {reason}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify, verify_merge

    problems = (verify_merge(args.out, workers=args.workers) if args.merge
                else verify(args.out, workers=args.workers, part=args.part))
    for problem in problems:
        print(problem)
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problems'}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else 0


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    summary = info(args.out)
    print(json.dumps(summary, indent=1) if args.json else format_info(summary))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import write_demo

    shards = write_demo(args.out, progress=True)
    print(f"demo shards in {shards} (splits train and val)")
    return 0


COMMANDS = {"convert": _convert, "verify": _verify, "info": _info, "demo": _demo, "index": index_command.run}

if __name__ == "__main__":
    sys.exit(main())
