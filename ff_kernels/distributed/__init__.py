"""Distributed FF training on torch.distributed (DESIGN section 9): data parallel and layer pipeline.

Run on every rank after the process group exists (``init()`` joins the one torchrun describes)::

    import ff_kernels as ffk

    device = ffk.distributed.init()                   # gloo on CPUs, NCCL on GPUs
    net = ffk.FFNet([784, 500, 500], seed=0, device=device)
    ffk.distributed.fit(net, x, y, mode="data", epochs=1000)                                # or:
    ffk.distributed.fit(net, x, y, mode="pipeline", epochs=60, batch_size=100, micro_batches=2)
    ffk.distributed.save(net, "ff.pt")                # every rank holds the trained network; rank 0 writes it

An FFConvNet trains the same way (x images), in either mode.

launched with ``torchrun --standalone --nproc-per-node 2 script.py`` (or ``-m ff_kernels train --distributed ...``).
"""

from ff_kernels.distributed.comm import DistributedError
from ff_kernels.distributed.pipeline import plan_stages
from ff_kernels.distributed.training import MODES, fit, init, save, state_digest

__all__ = ["MODES", "DistributedError", "fit", "init", "plan_stages", "save", "state_digest"]
