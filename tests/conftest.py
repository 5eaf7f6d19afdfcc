"""Test set-up. Triton kernels run under the interpreter on machines without a GPU; the variable must be set
before any kernel module is imported, which is why it lives here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
