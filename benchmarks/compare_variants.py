"""FF, FF with Layer Collaboration (both modes) and SymBa, trained at equal epochs and seeds; a Markdown table.

    python benchmarks/compare_variants.py                                   # digits, mohammadpz's recipe
    python benchmarks/compare_variants.py --dataset mnist --data-dir DIR    # MNIST from its IDX files

Any other ``ff-kernels train`` option for ``--model mlp`` applies to every variant (e.g. ``--schedule simultaneous
--batch-size 100``); each variant sets ``--loss`` and ``--collab``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ff_kernels.cli import add_train_arguments, build_net, resolve_train_arguments, train_once
from ff_kernels.data import load_dataset

VARIANTS = {
    "FF (Hinton's logistic loss)": dict(loss="logistic", collab="none"),
    "FF + collaboration, all layers": dict(loss="logistic", collab="all"),
    "FF + collaboration, previous layers": dict(loss="logistic", collab="previous"),
    "SymBa (alpha {alpha:g})": dict(loss="symba", collab="none"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    if args.model != "mlp" or args.loss is not None or args.collab is not None:
        parser.error("the variants are FFNets (--model mlp), and each sets --loss and --collab: leave those out")
    if args.distributed or args.compare_reference:
        parser.error("the variants train one after another in this process: leave out --distributed and "
                     "--compare-reference")
    args.no_progress, args.loss = True, "symba"  # symba: one variant's, so that --alpha applies
    try:
        resolve_train_arguments(args)
    except ValueError as err:
        parser.error(str(err))
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    print(f"`python benchmarks/compare_variants.py {' '.join(sys.argv[1:])}`: {dataset.name}, dims "
          f"{[dataset.num_features, *args.dims]}, {args.schedule}, {args.epochs} epochs, batch "
          f"{args.batch_size or 'full'}, {args.optimizer} lr {args.lr}, seed {args.seed}, device {args.device}\n")
    print("| variant | train accuracy | test accuracy | wall time (s) |")
    print("|---|---|---|---|")
    for name, options in VARIANTS.items():
        for key, value in options.items():
            setattr(args, key, value)
        result = train_once(args, dataset, build_net(args, dataset, args.backend, torch.device(args.device)))
        print(f"| {name.format(alpha=args.alpha)} | {result['train_acc']:.2%} | {result['test_acc']:.2%} | "
              f"{result['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
