"""ff-kernels: fused kernels for Forward-Forward training in PyTorch.

``ff_linear_step`` trains one FF layer on a positive and a negative batch in one call; ``FFLinear`` and
``FFNet`` wrap it for existing training loops. See DESIGN section 1 of the project for the numerical contract.
"""

from ff_kernels import data, optim
from ff_kernels.functional import ff_linear_forward, ff_linear_step
from ff_kernels.net import FFNet
from ff_kernels.nn import FFLinear
from ff_kernels.types import FFStepOutput

__version__ = "0.1.0"

__all__ = ["FFLinear", "FFNet", "FFStepOutput", "data", "ff_linear_forward", "ff_linear_step", "optim"]
