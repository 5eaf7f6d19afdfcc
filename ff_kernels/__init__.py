"""ff-kernels: fused kernels for Forward-Forward training in PyTorch.

``ff_linear_step`` trains one FF layer on a positive and a negative batch in one call; ``FFLinear`` and
``FFNet`` wrap it for existing training loops. ``ff_conv2d_step``, ``ff_conv2d_class_step`` and
``ff_linear_class_step`` do the same for conv layers and the class-goodness loss, wrapped by ``FFConv2d`` and
``FFConvNet``. ``BlockwiseFF`` trains a conv net (e.g. a torchvision ResNet-18) block by block through
``class_goodness_loss`` heads. See DESIGN sections 1, 7 and 8 of the project for the numerical contract.
"""

from ff_kernels import data, distributed, optim
from ff_kernels.blockwise import BackpropBaseline, BlockwiseFF
from ff_kernels.conv import ff_conv2d_class_step, ff_conv2d_forward, ff_conv2d_step, ff_linear_class_step
from ff_kernels.conv_net import FFConv2d, FFConvNet
from ff_kernels.functional import ff_linear_forward, ff_linear_step
from ff_kernels.heads import class_goodness, class_goodness_loss
from ff_kernels.net import FFNet
from ff_kernels.nn import FFLinear
from ff_kernels.types import FFClassStepOutput, FFStepOutput

__version__ = "0.1.0"

__all__ = [
    "BackpropBaseline",
    "BlockwiseFF",
    "FFClassStepOutput",
    "FFConv2d",
    "FFConvNet",
    "FFLinear",
    "FFNet",
    "FFStepOutput",
    "class_goodness",
    "class_goodness_loss",
    "data",
    "distributed",
    "ff_conv2d_class_step",
    "ff_conv2d_forward",
    "ff_conv2d_step",
    "ff_linear_class_step",
    "ff_linear_forward",
    "ff_linear_step",
    "optim",
]
