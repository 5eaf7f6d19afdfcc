"""``python -m ff_kernels`` is the ``ff-kernels`` command line."""

from ff_kernels.cli import main

raise SystemExit(main())
