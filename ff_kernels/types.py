"""The output record of one layer step."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FFStepOutput(NamedTuple):
    """What one FF layer step returns (DESIGN 1.8).

    ``goodness_*`` exclude the offsets; ``h_*`` are computed with the weights from before this step's update and
    are the next layer's input. ``grad_weight``/``grad_bias`` are returned only when no optimizer is given: with
    one, the update is applied in place and the gradients are never materialised by the fused paths.
    """

    loss: torch.Tensor
    goodness_pos: torch.Tensor
    goodness_neg: torch.Tensor
    h_pos: torch.Tensor
    h_neg: torch.Tensor
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None

    @classmethod
    def from_stacked(
        cls,
        loss: torch.Tensor,
        goodness: torch.Tensor,
        h: torch.Tensor,
        rows_pos: int,
        grad_weight: torch.Tensor | None,
        grad_bias: torch.Tensor | None,
    ) -> FFStepOutput:
        """The record from the stacked (P+Q)-row goodness and activations the fast paths compute."""
        return cls(
            loss=loss,
            goodness_pos=goodness[:rows_pos],
            goodness_neg=goodness[rows_pos:],
            h_pos=h[:rows_pos],
            h_neg=h[rows_pos:],
            grad_weight=grad_weight,
            grad_bias=grad_bias,
        )


class FFClassStepOutput(NamedTuple):
    """What one class-goodness step returns (DESIGN 7): no negative data, one goodness per (sample, class).

    ``goodness`` is (B, num_classes) float32 (float64 for float64 inputs); ``h`` is the post-ReLU activation, computed
    with the weights from before this step's update. ``grad_weight``/``grad_bias`` are None when an optimizer
    applied the update.
    """

    loss: torch.Tensor
    goodness: torch.Tensor
    h: torch.Tensor
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


StepOutput = FFStepOutput | FFClassStepOutput
