"""FF, FF with Layer Collaboration (both modes) and SymBa, trained at equal epochs and seeds; a Markdown table.

    python benchmarks/compare_variants.py                                   # digits, mohammadpz's recipe
    python benchmarks/compare_variants.py --dataset mnist --data-dir DIR    # MNIST from its IDX files

Any other ``ff-kernels train`` option applies to every variant (e.g. ``--schedule simultaneous --batch-size 100``).
"""

from __future__ import annotations

import argparse
import sys

from ff_kernels.cli import add_train_arguments, train_once
from ff_kernels.data import load_dataset

VARIANTS = {
    "FF (Hinton's logistic loss)": dict(loss="logistic", collab="none"),
    "FF + collaboration, all layers": dict(loss="logistic", collab="all"),
    "FF + collaboration, previous layers": dict(loss="logistic", collab="previous"),
    "SymBa (alpha 4)": dict(loss="symba", collab="none"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    args.no_progress = True
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    print(f"`python benchmarks/compare_variants.py {' '.join(sys.argv[1:])}`: {dataset.name}, dims "
          f"{[dataset.num_features, *args.dims]}, {args.schedule}, {args.epochs} epochs, batch "
          f"{args.batch_size or 'full'}, {args.optimizer} lr {args.lr}, seed {args.seed}, device {args.device}\n")
    print("| variant | train accuracy | test accuracy | wall time (s) |")
    print("|---|---|---|---|")
    for name, options in VARIANTS.items():
        for key, value in options.items():
            setattr(args, key, value)
        result = train_once(args, dataset, args.backend)
        print(f"| {name} | {result['train_acc']:.2%} | {result['test_acc']:.2%} | {result['seconds']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
