"""`delrec export RUN_DIR --format nir -o model.nir`: a trained network for neuromorphic
hardware, with integer delays (:mod:`delrec.deploy.nir_format`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from delrec.checkpoint import is_hdf5
from delrec.commands import EXIT_CODES_HELP, UsageError, check_outputs, nonempty
from delrec.deploy.nir_format import export_nir
from delrec.runs import checkpoint_file, default_nir_path, load_trained, run_files


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained network for neuromorphic hardware (NIR)",
        description="Export the network of a run directory (or checkpoint file) with integer "
        "delays. The NIR file states its time convention in its metadata. A network whose "
        "integer delays exceed its network.max_delay (the chip limit it was trained for) is "
        "refused.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint .pt file")
    parser.add_argument(
        "--format", choices=["nir"], default="nir", help="output format (default nir)"
    )
    parser.add_argument(
        "-o", "--output", type=nonempty(Path), help="output file (default RUN_DIR/model.nir)"
    )
    parser.add_argument(
        "--dt",
        type=float,
        default=1.0,
        help="seconds per time step written into the file (default 1: time in steps; "
        "SHD bins are 0.01)",
    )
    parser.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="which checkpoint of a run directory (default best)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    default = default_nir_path(args.run_dir)
    output = Path(args.output) if args.output else default
    checkpoint = checkpoint_file(args.run_dir, args.checkpoint)
    payload, net = load_trained(checkpoint)  # first: its errors say what the input is
    # the run's own files, less earlier exports (which a new export replaces)
    protected = {p for p in run_files(args.run_dir) if p.suffix != ".nir"} | {checkpoint.resolve()}
    check_outputs({"-o": output}, protected, f"write the NIR file elsewhere, e.g. -o {default}")
    if output.is_file() and not is_hdf5(output):
        raise UsageError(
            f"-o {output} exists and is not a NIR (HDF5) file, which the export would replace: "
            "remove it first, or give another path"
        )
    metadata = input_metadata(payload)
    try:
        graph = export_nir(net, output, dt=args.dt, metadata=metadata)
    except ValueError as error:  # a bad --dt, delays beyond max_delay, a network NIR cannot
        # express (NIRExportError)
        raise UsageError(str(error)) from None
    delays = sum(type(node).__name__ == "Delay" for node in graph.nodes.values())
    print(
        f"wrote {output}: {len(graph.nodes)} NIR nodes ({delays} Delay), "
        f"{len(graph.edges)} edges, dt = {args.dt} s"
    )
    if "input_standardization" in metadata:
        mean, std = metadata["input_standardization"]
        print(
            f"note: the network takes (x - {mean:.6g}) / {std:.6g} and predicts on that scale "
            f"(a prediction y is y * {std:.6g} + {mean:.6g}); the graph's metadata records it "
            "(input_standardization, output_standardization)"
        )
    if "input_order" in metadata:
        print(
            "note: step t of the input is pixel input_order[t] of the image (the run's "
            "permutation, in the graph's metadata)"
        )
    return 0


def input_metadata(payload: dict) -> dict:
    """What the run did to its data that only its checkpoint records, for the graph's metadata:
    its task, its standardisation (``[mean, std]`` of inputs and targets) and pixel order,
    where it has them (a task's own input scale is in docs/data.md)."""
    metadata = {"task": str(payload.get("train_config", {}).get("task", "unknown"))}
    if payload.get("standardization") is not None:
        mean, std = (float(v) for v in payload["standardization"])
        metadata["input_standardization"] = [mean, std]
        metadata["output_standardization"] = [mean, std]
    if payload.get("data_permutation") is not None:
        metadata["input_order"] = [int(i) for i in payload["data_permutation"]]
    return metadata
