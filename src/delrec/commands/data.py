"""`delrec data …`: download the official files, list the data sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from delrec.commands import EXIT_CODES_HELP, nonempty
from delrec.config import preset
from delrec.data import DATASETS, RESOURCES, dataset_info, default_dir, download, settings_of
from delrec.data.fetch import MIRROR_VARIABLE
from delrec.data.registry import FOLDERS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="download and inspect data sets", epilog=EXIT_CODES_HELP
    )
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION")
    commands.required = True
    fetch = commands.add_parser(
        "download",
        help="fetch, verify (MD5), resume and extract the official files",
        description="Fetch the official archives of a data set (or from a mirror), check their "
        "MD5 sums, resume broken transfers, extract them and record each extracted file's "
        "MD5 beside it (<file>.md5); files already there are checked before they are reported.",
        epilog=EXIT_CODES_HELP,
    )
    fetch.add_argument(
        "name",
        choices=sorted(RESOURCES),
        help="the data set: shd and ssc (Heidelberg spoken digits and commands), mnist "
        "(for psmnist)",
    )
    fetch.add_argument(
        "--to",
        type=nonempty(Path),
        default=None,
        metavar="DIR",
        help="destination folder (default: $DELREC_DATA/<name> or data/<name>)",
    )
    fetch.add_argument(
        "--mirror",
        metavar="URL",
        type=nonempty(str),
        help="fetch the archives from this base URL (https://…, file://…) or folder, where they "
        "sit under their file names, instead of the official servers (default: "
        f"${MIRROR_VARIABLE} when set); their MD5 sums are checked all the same",
    )
    fetch.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (there is none where stderr is not a terminal)",
    )
    fetch.set_defaults(run=_run_download)
    listing = commands.add_parser(
        "list",
        help="the data sets: sizes, file folders and data.* settings",
        description="Each data set's sizes and its data.* settings as `delrec train --task NAME` "
        "uses them (the task's preset; a value that differs from the data set's own default "
        "says so), and the folder its files are read from. Change a setting with "
        "`delrec train --set data.NAME=VALUE`.",
        epilog=EXIT_CODES_HELP,
    )
    listing.set_defaults(run=_run_list)


def _run_download(args: argparse.Namespace) -> int:
    to = args.to if args.to is not None else default_dir(args.name)
    for path in download(args.name, to, progress=not args.quiet, mirror=args.mirror):
        print(path)
    return 0


def _run_list(args: argparse.Namespace) -> int:
    for name in DATASETS:
        trained, defaults = preset(name).data, settings_of(name)
        info = dataset_info(name, **trained)
        classes = f"{info.num_classes} classes" if info.num_classes else "regression"
        steps = info.steps if info.steps is not None else "variable"
        where = default_dir(name) if name in FOLDERS else "built in, no download"
        print(f"{name:13s} input {info.input_size:3d}  steps {steps!s:8s} {classes:11s}  {where}")
        settings = [
            f"{key}={json.dumps(value)}"
            + (f" (default {json.dumps(defaults[key])})" if value != defaults[key] else "")
            for key, value in trained.items()
        ]
        print(f"{'':13s} data.*: {', '.join(settings)}")
    return 0
