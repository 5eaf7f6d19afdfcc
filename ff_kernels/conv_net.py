"""``FFConv2d`` and ``FFConvNet``: convolutional FF layers and networks (DESIGN 7).

The default recipe is CwComp's (Papachristodoulou et al., AAAI 2024): every layer's channels form one group per
class, each layer learns from (x, y) alone by the cross-entropy of its class goodness, and the network predicts by
the class goodness summed over its layers. Trifecta's positive/negative alternative, with the label as extra input
channels, is an option.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ff_kernels._options import (
    LOSSES,
    ConvGeometry,
    check_choice,
    check_class_options,
    check_compute_dtype,
    check_conv_geometry,
    check_pair,
    check_step_options,
)
from ff_kernels.blockwise import LR_SCHEDULES, lr_factor
from ff_kernels.conv import IntPair, ff_conv2d_class_step, ff_conv2d_forward, ff_conv2d_step
from ff_kernels.net import NEGATIVES, SCHEDULES, Checkpointed
from ff_kernels.nn import check_backend, check_batch_size, check_targets, is_count, labelled_accuracy
from ff_kernels.optim import OPTIMIZERS, FusedOptimizer
from ff_kernels.types import StepOutput

CONV_LOSSES = ("class", *LOSSES)
NEXT_NORMS = ("instance", "layer", "none")


class FFConv2d(nn.Module):
    """A conv + ReLU layer trained by its own FF loss.

    ``loss="class"``: the output channels form ``num_classes`` contiguous groups and the layer learns from a batch
    and its labels; ``"logistic"`` or ``"symba"``: from a positive and a negative batch (the label travels in the
    input, so these take no ``num_classes``). ``layer(x)`` returns h (no gradient flows: FF trains layer-locally),
    ``layer.goodness(x)`` the goodness per sample, or per (sample, class) for the class loss, and
    ``layer.train_step(...)`` one fused step.
    ``normalize`` defaults to the step functions' defaults: "none" for the class loss, "l2" otherwise. Parameters
    are initialised as ``nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        *,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        loss: str = "logistic",
        num_classes: int | None = None,
        threshold: float = 2.0,
        goodness: str = "mean",
        temperature: float = 1.0,
        normalize: str | None = None,
        eps: float = 1e-4,
        alpha: float = 4.0,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (is_count(in_channels) and is_count(out_channels)):
            raise ValueError(
                f"in_channels and out_channels must be positive integers; got {in_channels!r}, {out_channels!r}"
            )
        in_channels, out_channels = int(in_channels), int(out_channels)
        self.loss = check_choice("loss", loss, CONV_LOSSES)
        normalize = normalize or ("none" if loss == "class" else "l2")
        if loss == "class":
            if not is_count(num_classes) or num_classes < 2 or out_channels % num_classes:
                raise ValueError(
                    f"loss='class' needs num_classes >= 2 dividing out_channels={out_channels}; got {num_classes!r}"
                )
            check_class_options(
                num_classes=num_classes, goodness=goodness, temperature=temperature, normalize=normalize, eps=eps,
                channels=out_channels, positions=1,
            )
        elif num_classes is not None:
            raise ValueError(
                f"num_classes applies to the class-goodness loss (loss='class') only; got num_classes={num_classes!r} "
                f"with loss={loss!r}, whose label travels in the input"
            )
        else:
            check_step_options(
                threshold=threshold, goodness=goodness, loss=loss, normalize=normalize, eps=eps, alpha=alpha,
                out_features=out_channels,
            )
        kernel = check_pair("kernel_size", kernel_size, 1)
        geometry = check_conv_geometry(stride, padding, dilation)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding, self.dilation = geometry.stride, geometry.padding, geometry.dilation
        self.num_classes = num_classes if loss == "class" else None
        self.threshold, self.temperature, self.eps, self.alpha = threshold, temperature, eps, alpha
        self.goodness_kind, self.normalize = goodness, normalize
        check_backend(backend, "conv2d_class_step" if loss == "class" else "conv2d_step", "conv2d_forward")
        self.backend, self.compute_dtype, self.check_finite = backend, compute_dtype, check_finite
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        check_compute_dtype(compute_dtype, self.weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def _geometry(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def forward_with_goodness(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h and its goodness from one pass (GEMM 1 alone): (B,) or, for the class loss, (B, num_classes)."""
        return ff_conv2d_forward(
            x,
            self.weight,
            self.bias,
            **self._geometry(),
            goodness=self.goodness_kind,
            normalize=self.normalize,
            eps=self.eps,
            num_classes=self.num_classes,
            backend=self.backend,
            compute_dtype=self.compute_dtype,
            check_finite=self.check_finite,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_goodness(x)[0]

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_goodness(x)[1]

    def train_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        optimizer: FusedOptimizer | None = None,
        *,
        offset_pos: torch.Tensor | None = None,
        offset_neg: torch.Tensor | None = None,
    ) -> StepOutput:
        """One fused step. ``loss="class"``: ``x`` is the batch and ``target`` its labels (FFClassStepOutput);
        otherwise ``x`` is the positive batch and ``target`` the negative one (FFStepOutput)."""
        common = dict(
            **self._geometry(),
            goodness=self.goodness_kind,
            normalize=self.normalize,
            eps=self.eps,
            optimizer=optimizer,
            backend=self.backend,
            compute_dtype=self.compute_dtype,
            check_finite=self.check_finite,
        )
        if self.loss != "class":
            return ff_conv2d_step(
                x,
                target,
                self.weight,
                self.bias,
                threshold=self.threshold,
                loss=self.loss,
                alpha=self.alpha,
                offset_pos=offset_pos,
                offset_neg=offset_neg,
                **common,
            )
        if offset_pos is not None or offset_neg is not None:
            raise ValueError("offsets belong to the positive/negative losses; loss='class' takes none")
        return ff_conv2d_class_step(
            x, target, self.weight, self.bias, num_classes=self.num_classes, temperature=self.temperature, **common
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, loss={self.loss!r}, "
            f"num_classes={self.num_classes}, goodness={self.goodness_kind!r}, normalize={self.normalize!r}, "
            f"backend={self.backend!r}"
        )


class FFConvNet(Checkpointed, nn.Module):
    """A stack of FF conv layers in the CwComp style: conv, ReLU, an optional 2x2 max-pool, and a parameter-free
    normalisation of the next layer's input.

    ``next_norm="instance"`` (default) standardises each channel of a sample over its positions: it removes the
    channel energies, which are this layer's class goodness, so the next layer must learn from the spatial pattern
    (Hinton's reason for normalising between FF layers; CwComp's BatchNorm without parameters or batch statistics).
    ``"layer"`` standardises each sample over all channels and positions; ``"none"`` leaves only the per-sample
    input scale r_b of every step (``normalize``).

    ``loss="class"`` (default): each layer's ``channels[i]`` form ``num_classes`` groups, every layer learns from
    (x, y) alone, and the prediction is the argmax of the class goodness summed over the layers (optionally all but
    the first). ``loss="logistic"`` or ``"symba"`` (Trifecta's way): the label enters the first layer as
    ``num_classes`` constant one-hot channels at the training inputs' maximum, negatives carry a wrong label
    (``negatives`` as in FFNet), and the prediction sweeps the labels as FFNet does.

    ``kernel_size`` and ``pool`` take one value for every layer or one per layer; ``pool[i]`` max-pools layer i's
    output before layer i+1, and ``padding=None`` keeps the size ("same" padding, odd kernels). Each layer has its own
    optimizer (``optimizer`` in "adam", "adamw", "sgd", with ``lr``, ``lr_schedule`` and ``optimizer_options``).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int = 10,
        *,
        loss: str = "class",
        kernel_size: int | Sequence[int] = 3,
        padding: int | None = None,
        pool: bool | Sequence[bool] = True,
        next_norm: str = "instance",
        threshold: float = 2.0,
        goodness: str = "mean",
        temperature: float = 1.0,
        normalize: str = "rms",
        eps: float = 1e-4,
        alpha: float = 4.0,
        negatives: str = "wrong",
        optimizer: str = "adam",
        lr: float = 1e-3,
        lr_schedule: str = "cosine",
        optimizer_options: dict[str, Any] | None = None,
        predict_skip_first: bool = False,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not is_count(in_channels) or not channels or not all(is_count(c) for c in channels):
            raise ValueError(
                f"in_channels and channels must be positive integers, with at least one layer; got {in_channels!r}, "
                f"{channels!r}"
            )
        channels = [int(c) for c in channels]
        if not is_count(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be at least 2; got {num_classes!r}")
        check_choice("loss", loss, CONV_LOSSES)
        check_choice("negatives", negatives, NEGATIVES)
        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        check_choice("next_norm", next_norm, NEXT_NORMS)
        pools = [bool(pool)] * len(channels) if isinstance(pool, bool) else [bool(p) for p in pool]
        kernels = list(kernel_size) if isinstance(kernel_size, Sequence) else [kernel_size] * len(channels)
        if not all(is_count(k) for k in kernels):
            raise ValueError(f"kernel_size must be a positive integer or one per layer; got {kernel_size!r}")
        kernels = [int(k) for k in kernels]
        for name, values in (("pool", pools), ("kernel_size", kernels)):
            if len(values) != len(channels):
                raise ValueError(f"{name} lists {len(values)} layers but channels lists {len(channels)}")
        if predict_skip_first and len(channels) < 2:
            raise ValueError("predict_skip_first needs at least two layers")
        self.config = dict(
            in_channels=in_channels,
            channels=channels,
            num_classes=num_classes,
            loss=loss,
            kernel_size=kernels,
            padding=padding,
            pool=pools,
            next_norm=next_norm,
            threshold=threshold,
            goodness=goodness,
            temperature=temperature,
            normalize=normalize,
            eps=eps,
            alpha=alpha,
            negatives=negatives,
            optimizer=optimizer,
            lr=lr,
            lr_schedule=lr_schedule,
            optimizer_options=dict(optimizer_options or {}),
            predict_skip_first=predict_skip_first,
            backend=backend,
            compute_dtype=compute_dtype,
            seed=seed,
        )
        self.in_channels, self.num_classes, self.loss, self.negatives = in_channels, num_classes, loss, negatives
        self.pool, self.next_norm, self.eps = pools, next_norm, eps
        self.predict_skip_first, self.lr_schedule = predict_skip_first, lr_schedule
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        label_channels = 0 if loss == "class" else num_classes
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.layers = nn.ModuleList(
                FFConv2d(
                    c_in,
                    c_out,
                    kernel,
                    padding=kernel // 2 if padding is None else padding,
                    loss=loss,
                    num_classes=num_classes if loss == "class" else None,
                    threshold=threshold,
                    goodness=goodness,
                    temperature=temperature,
                    normalize=normalize,
                    eps=eps,
                    alpha=alpha,
                    backend=backend,
                    compute_dtype=compute_dtype,
                )
                for c_in, c_out, kernel in zip([in_channels + label_channels, *channels[:-1]], channels, kernels)
            )
        self.to(device)
        self.register_buffer("label_value", torch.ones((), device=device))
        self.optimizers: list[FusedOptimizer] = [
            OPTIMIZERS[optimizer](list(layer.parameters()), lr=lr, **(optimizer_options or {})) for layer in self.layers
        ]

    @property
    def device(self) -> torch.device:
        return self.layers[0].weight.device

    def next_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i+1's input from layer i's activations: max-pooled, then normalised (``next_norm``)."""
        if self.pool[i]:
            h = F.max_pool2d(h, 2)
        if self.next_norm == "instance":
            if h.shape[2] * h.shape[3] == 1:
                raise ValueError(
                    f"layer {i + 1}'s output has one position, which next_norm='instance' would erase; pool less or "
                    "use next_norm='layer'"
                )
            return F.instance_norm(h, eps=self.eps)
        if self.next_norm == "layer":
            return F.layer_norm(h, h.shape[1:], eps=self.eps)
        return h

    def with_labels(self, x: torch.Tensor, labels: torch.Tensor | int) -> torch.Tensor:
        """x with ``num_classes`` label channels appended: one-hot planes at ``label_value``."""
        x = x.to(self.device, self.layers[0].weight.dtype)
        planes = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:], dtype=x.dtype, device=x.device)
        if isinstance(labels, int):
            planes[:, labels] = self.label_value
        else:
            planes[torch.arange(x.shape[0], device=x.device), labels.to(x.device)] = self.label_value.to(x.dtype)
        return torch.cat([x, planes], dim=1)

    def negative_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Wrong labels for the negatives: uniform among the wrong ones, or a permutation of the batch's."""
        if self.negatives == "shuffle":
            return labels[torch.randperm(labels.shape[0], generator=self.generator).to(labels.device)]
        shift = torch.randint(1, self.num_classes, labels.shape, generator=self.generator).to(labels.device)
        return (labels + shift) % self.num_classes

    def _check_data(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """The public methods' checks of their data, once per call: x finite images that every layer and pool can
        take, y integer labels in range, one per image."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be a (samples, {self.in_channels}, height, width) tensor; got {getattr(x, 'shape', type(x))}"
            )
        if x.shape[0] == 0:
            raise ValueError("x is empty")
        problem = self._size_problem(tuple(x.shape[2:]))
        if problem is not None:
            smallest = next(n for n in itertools.count(1) if self._size_problem((n, n)) is None)
            raise ValueError(
                f"x images of {x.shape[2]}x{x.shape[3]} do not fit this network: {problem}; it takes images of at "
                f"least {smallest}x{smallest}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        if y is not None:
            check_targets(y, x.shape[0], self.num_classes)

    def _size_problem(self, size: tuple[int, int]) -> str | None:
        """Why images of ``size`` (height, width) cannot pass through the layers and pools, or None."""
        for i, layer in enumerate(self.layers):
            geometry = ConvGeometry(layer.stride, layer.padding, layer.dilation)
            out = geometry.output_size(size, layer.kernel_size)
            if min(out) <= 0:
                kernel = "x".join(map(str, layer.kernel_size))
                return (
                    f"layer {i + 1}'s {kernel} kernel with padding={layer.padding} would turn its {size[0]}x{size[1]} "
                    f"input into {out[0]}x{out[1]}"
                )
            if i + 1 == len(self.layers):
                return None
            if self.pool[i]:
                if min(out) < 2:
                    return f"layer {i + 1}'s {out[0]}x{out[1]} output is too small for its 2x2 max-pool"
                out = (out[0] // 2, out[1] // 2)
            if self.next_norm == "instance" and out == (1, 1):
                return f"layer {i + 1}'s output has one position, which next_norm='instance' would erase"
            size = out
        return None

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int = 20,
        batch_size: int | None = 32,
        schedule: str = "simultaneous",
        lr_schedule: str | None = None,
        progress: bool = False,
    ) -> list[list[float]]:
        """Train on images x (n, C, H, W) and labels y. Returns the mean loss of each layer for each epoch.

        ``schedule="simultaneous"``: on every batch each layer steps once, fed the previous layer's activations
        from that same step. ``"greedy"``: layer 1 trains for ``epochs`` epochs, then layer 2 on the fixed layer 1's
        outputs (recomputed per batch, so no activations of the whole data set are held), and so on.
        ``lr_schedule`` (default: the network's): "constant", "cosine" (to zero) or "step" (x0.1 at half and three
        quarters) over each layer's steps, from the ``lr`` the network was built with.
        """
        from tqdm.auto import tqdm

        check_choice("schedule", schedule, SCHEDULES)
        self._check_data(x, y)
        check_batch_size(batch_size, allow_none=True)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive; got {epochs}")
        x, y = x.to(self.device, self.layers[0].weight.dtype), y.to(self.device, torch.int64)
        if self.loss != "class":
            self.label_value.fill_(float(x.max()))
        history: list[list[float]] = [[] for _ in self.layers]
        stages = [None] if schedule == "simultaneous" else range(len(self.layers))
        rate = self.learning_rates(x.shape[0], epochs, batch_size, lr_schedule)
        bar = tqdm(total=epochs * len(stages), disable=not progress, desc=f"FF conv {schedule}", unit="epoch")
        for stage in stages:
            for epoch in range(epochs):
                sums = torch.zeros(len(self.layers), device=self.device)
                batches = self._batches(x.shape[0], batch_size)
                for k, rows in enumerate(batches):
                    self.set_learning_rate(rate(epoch, k))
                    for i, out in self.step_batch(x[rows], y[rows], only=stage):
                        sums[i] += out.loss
                trained = range(len(self.layers)) if stage is None else [stage]
                for i in trained:
                    history[i].append(float(sums[i]) / len(batches))
                bar.update()
                bar.set_postfix(loss=f"{history[trained[-1]][-1]:.4f}")
        bar.close()
        self.set_learning_rate()  # the schedule belongs to this call; a step outside fit uses the base rate
        return history

    def learning_rates(self, rows: int, epochs: int, batch_size: int | None,
                       lr_schedule: str | None = None) -> Callable[[int, int], float]:
        """``fit``'s learning rate for batch ``k`` of ``epoch`` on ``rows`` samples: the network's ``lr`` times
        ``lr_schedule`` (default the network's) over every step of the run."""
        steps_per_epoch = 1 if batch_size is None else math.ceil(rows / batch_size)
        factor = lr_factor(lr_schedule or self.lr_schedule, epochs * steps_per_epoch)
        return lambda epoch, k: self.config["lr"] * factor(epoch * steps_per_epoch + k)

    def set_learning_rate(self, lr: float | None = None, layers: Iterable[int] | None = None) -> None:
        """The optimizers of ``layers`` (every layer's by default) at ``lr``; None: the rate the network was built
        with."""
        for i in range(len(self.layers)) if layers is None else layers:
            self.optimizers[i].lr = self.config["lr"] if lr is None else lr

    def _batches(self, rows: int, batch_size: int | None) -> list[torch.Tensor] | list[slice]:
        if batch_size is None or batch_size >= rows:
            return [slice(None)]
        return list(torch.randperm(rows, generator=self.generator).to(self.device).split(batch_size))

    def step_batch(self, x: torch.Tensor, y: torch.Tensor, only: int | None = None) -> list[tuple[int, StepOutput]]:
        """One step of every layer (``only=None``) or of layer ``only`` alone, on one batch; returns (layer, output)
        pairs. Layer i is fed layer i-1's activations from its step, computed with its pre-update weights, or, for
        ``only``, from a forward pass of the fixed earlier layers."""
        if self.loss == "class":
            inputs: tuple[torch.Tensor, ...] = (x,)
        else:
            inputs = (self.with_labels(x, y), self.with_labels(x, self.negative_labels(y)))
        outs = []
        count = len(self.layers) if only is None else only + 1
        for i, layer in enumerate(self.layers[:count]):
            if only is not None and i < only:
                inputs = tuple(self.next_input(i, layer(t)) for t in inputs)
                continue
            if self.loss == "class":
                out = layer.train_step(inputs[0], y, self.optimizers[i])
                h: tuple[torch.Tensor, ...] = (out.h,)
            else:
                out = layer.train_step(inputs[0], inputs[1], self.optimizers[i])
                h = (out.h_pos, out.h_neg)
            if i + 1 < count:  # the last layer's output feeds nothing: no pool or normalisation of it
                inputs = tuple(self.next_input(i, t) for t in h)
            outs.append((i, out))
        return outs

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(samples, num_classes): the class goodness summed over the layers (all, or all but the first); for the
        positive/negative losses, the goodness summed over the layers with each candidate label in the input."""
        self._check_data(x)
        check_batch_size(batch_size)
        first = 1 if self.predict_skip_first else 0
        scores = torch.zeros(x.shape[0], self.num_classes, device=self.device)
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(self.device, self.layers[0].weight.dtype)
            rows = slice(start, start + chunk.shape[0])
            if self.loss == "class":
                scores[rows] = self._summed_goodness(chunk, first)
                continue
            for label in range(self.num_classes):
                scores[rows, label] = self._summed_goodness(self.with_labels(chunk, label), first)
        return scores

    def _summed_goodness(self, h: torch.Tensor, first: int) -> torch.Tensor:
        total = 0.0
        for i, layer in enumerate(self.layers):
            h, g = layer.forward_with_goodness(h)
            if i >= first:
                total = total + g
            if i + 1 < len(self.layers):
                h = self.next_input(i, h)
        return total

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return self.class_scores(x, batch_size).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
        return labelled_accuracy(self.predict(x, batch_size), y, self.num_classes)  # checks x first
