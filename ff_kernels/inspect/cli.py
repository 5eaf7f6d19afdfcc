"""``ff-kernels inspect`` on the command line: the parser (its description is the package's overview), the checks
of the output paths before anything compiles, and the run that prints and writes the report."""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ff_kernels.bench import kn_pair, positive_int
from ff_kernels.inspect.arch import ARCHS
from ff_kernels.inspect.cache import default_cache_dir
from ff_kernels.inspect.output import format_records, format_summary, write_json
from ff_kernels.inspect.report import run_inspect
from ff_kernels.inspect.targets import OPTIMIZERS, PRECISIONS, SUBSETS, Selection


def _names(choices: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}; got {text!r}")
        return values

    return parse


def _ints(minimum: int):
    """argparse type: comma-separated integers, each at least ``minimum``."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}; got {text!r}")
        return values

    return parse


def _layers(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(kn_pair(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected K x N pairs, e.g. 784x500,2000x2000; got {text!r}") from err


def _writable(path: Path | None, flag: str) -> None:
    """Fail before the compiling, not after it: the output file must be one this process can create or replace (a
    trial open, undone if it created the file)."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be written ({err.strerror or err})") from err
    if not existed:
        path.unlink()


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``ff-kernels inspect``."""
    parser = subcommands.add_parser(
        "inspect", help="compile every GPU kernel ahead of time (no GPU needed) and check registers, spills, "
        "shared memory, MMA instructions, occupancy and waves",
        description=importlib.import_module(__package__).__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    parser.add_argument("--text", type=Path, default=None, help="write the summary and every record to this file")
    parser.add_argument("--gates", action="store_true", help="exit with status 1 when a gate fails, listing them")
    parser.add_argument("--subset", choices=tuple(SUBSETS), default=None,
                        help="a preset selection (ci: both GEMMs and the row kernel, bf16, Adam, sm_90, config 0, "
                        "784x500 at P=Q=4096); each other filter given replaces that field of the preset")
    parser.add_argument("--kernel", type=lambda t: tuple(v for v in t.split(",") if v), default=None,
                        help="kernel name substrings, e.g. forward,grad")
    parser.add_argument("--arch", type=_names(tuple(ARCHS)), default=None)
    parser.add_argument("--dtype", type=_names(PRECISIONS), default=None, help="bf16,fp16,tf32,ieee")
    parser.add_argument("--optimizer", type=_names(OPTIMIZERS), default=None, help="none,sgd,adam")
    parser.add_argument("--rows", type=_ints(1), default=None, help="P = Q values (default DESIGN 4's 512,4096,25000)")
    parser.add_argument("--kn", type=_layers, default=None, help="K x N layers (default DESIGN 4's four)")
    parser.add_argument("--config", type=_ints(0), default=None,
                        help="positions in each launch's autotune candidates, after its pruning (default all)")
    parser.add_argument("--source", type=_names(("triton", "cuda")), default=None, help="triton,cuda")
    parser.add_argument("--jobs", type=positive_int, default=2, help="compile processes (default 2)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="compile cache folder")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--verbose", action="store_true", help="also print every binary and every failed gate")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _writable(args.json, "--json")
    _writable(args.text, "--text")
    selection = SUBSETS[args.subset] if args.subset else Selection()
    overrides = {"kernels": args.kernel, "archs": args.arch, "precisions": args.dtype, "optimizers": args.optimizer,
                 "rows": args.rows, "layers": args.kn, "configs": args.config, "sources": args.source}
    selection = replace(selection, **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    report = run_inspect(selection, jobs=args.jobs, cache_dir=None if args.no_cache else args.cache_dir,
                         progress=not args.no_progress)
    if not report.kernels:  # a gate over nothing proves nothing
        report.failures.append("selection: no binary matches these filters (see --help for the names)")
    summary = format_summary(report)
    print(summary)
    if args.verbose:
        print("\n" + format_records(report))
    elif args.gates and report.failures:
        print("\nFailed gates:\n" + "\n".join(f"  {f}" for f in report.failures))
    print(f"\n{len(report.kernels)} binaries, {len(report.launches)} launches in {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text(summary + "\n\n" + format_records(report) + "\n")
        print(f"wrote {args.text}")
    return 1 if args.gates and report.failures else 0
