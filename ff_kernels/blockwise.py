"""Block-wise hybrid training (Scalable FF, DESIGN 8): ``BlockwiseFF``, its end-to-end backprop twin
``BackpropBaseline``, and the networks they cut into blocks (a small CNN; torchvision's ResNet-18 and MobileNetV3).

A network is a list of blocks. ``BlockwiseFF`` gives each block a head (a 1x1 convolution to ``num_classes``
channels, or a linear map for flat outputs) and its own optimizer. A step runs block i with autograd,
backpropagates its head's :func:`~ff_kernels.heads.class_goodness_loss` inside block i and head i, steps, frees the
gradients, and hands the detached output on: no gradient crosses a block boundary, so at most one block's activations
and gradients are alive at once. ``BackpropBaseline`` trains the same blocks end to end through a linear classifier
on the last block's pooled output, for the comparison a paper needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ff_kernels._options import check_choice, check_finite_number
from ff_kernels.heads import class_goodness, class_goodness_loss
from ff_kernels.nn import check_backend, check_batch_size, check_targets, labelled_accuracy

MODELS = ("small_cnn", "resnet18", "mobilenet_v3_small")
TORCHVISION_MODELS = ("resnet18", "mobilenet_v3_small")
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float, dict[str, Any]]] = {
    # name: (class, default lr, default options)
    "sgd": (torch.optim.SGD, 0.05, {"momentum": 0.9, "weight_decay": 5e-4}),
    "adam": (torch.optim.Adam, 1e-3, {}),
    "adamw": (torch.optim.AdamW, 1e-3, {}),
}
LR_SCHEDULES = ("constant", "cosine", "step")
SCHEDULES = ("simultaneous", "greedy")
PREDICT = ("mean", "last")
Transform = Callable[[torch.Tensor], torch.Tensor]


def lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step: linear warm-up, then constant, cosine to zero, or
    step decay (x0.1 at half and at three quarters of the steps)."""
    check_choice("lr_schedule", schedule, LR_SCHEDULES)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return factor


class _Trainer(nn.Module):
    """What both trainers share: the blocks, optimizers and LR schedules, batching, autocast and prediction."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        num_classes: int,
        *,
        sample_shape: Sequence[int],
        optimizer: str = "sgd",
        lr: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        lr_schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks must be a non-empty sequence of nn.Module")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2; got {num_classes!r}")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if not self.sample_shape or min(self.sample_shape) <= 0:
            raise ValueError(f"sample_shape must list positive sizes, e.g. (3, 32, 32); got {sample_shape!r}")
        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be non-negative; got {warmup_epochs!r}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16; got {autocast_dtype}")
        optimizer_class, default_lr, defaults = OPTIMIZERS[optimizer]
        options = {**defaults, "lr": default_lr if lr is None else lr, **(optimizer_options or {})}
        self.optimizer_spec = (optimizer_class, options)
        self.num_classes, self.lr_schedule, self.warmup_epochs = num_classes, lr_schedule, warmup_epochs
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last and len(self.sample_shape) == 3
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self.memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.blocks = nn.ModuleList(blocks).to(device, memory_format=self.memory_format)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        optimizer_class, options = self.optimizer_spec
        return optimizer_class(params, **options)

    def autocast(self) -> torch.autocast:
        """The mixed-precision context of every forward (a no-op without ``autocast_dtype``)."""
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def output_shapes(self) -> list[tuple[int, ...]]:
        """Each block's output shape for one sample, from a forward pass of two zero samples in eval mode."""
        was_training = self.training
        self.eval()
        h = self.prepare(torch.zeros(2, *self.sample_shape))
        shapes = []
        for i, block in enumerate(self.blocks):
            try:
                h = block(h)
            except RuntimeError as err:
                raise ValueError(
                    f"sample_shape={self.sample_shape} does not fit the blocks: block {i} cannot take input of shape "
                    f"{tuple(h.shape[1:])} ({err})"
                ) from err
            shapes.append(tuple(h.shape[1:]))
        self.train(was_training)
        return shapes

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1) -> None:
        """The public methods' checks of their arguments, once per call: x finite floating samples of
        ``sample_shape`` (any float dtype: :meth:`prepare` casts each batch to the parameters'), y integer labels
        in range, one per sample, and a positive batch size."""
        check_batch_size(batch_size)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] == 0:
            raise ValueError(
                f"x must be a non-empty (samples, {', '.join(map(str, self.sample_shape))}) tensor; got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor; got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        if y is not None:
            check_targets(y, x.shape[0], self.num_classes)

    def batches(self, rows: int, batch_size: int) -> list[torch.Tensor]:
        """A seeded permutation in batches of ``batch_size``; a last, partial batch is dropped when there is a full
        one (BatchNorm needs more than one sample, and every step then sees the same batch size)."""
        chunks = list(torch.randperm(rows, generator=self.generator).split(batch_size))
        return chunks[:-1] if len(chunks) > 1 and len(chunks[-1]) < batch_size else chunks

    def schedulers(self, optimizers: Sequence[torch.optim.Optimizer], epochs: int, steps_per_epoch: int) -> list:
        """One LR schedule per optimizer over ``epochs`` epochs, stepped once per batch."""
        total, warmup = epochs * steps_per_epoch, round(self.warmup_epochs * steps_per_epoch)
        factor = lr_factor(self.lr_schedule, total, warmup)
        return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the trainer's device, channels-last for conv nets (oneDNN and cuDNN then need no layout copy
        of each activation: on the CPU one activation-sized tensor less in a block's backward)."""
        x = x.to(self.device, next(self.parameters()).dtype, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def batch(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, transform: Transform | None):
        xb, yb = x[rows].to(self.device, non_blocking=True), y[rows].to(self.device, torch.int64, non_blocking=True)
        return self.prepare(xb if transform is None else transform(xb)), yb

    def class_scores(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return self.class_scores(x, batch_size).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
        return labelled_accuracy(self.predict(x, batch_size), y, self.num_classes)  # checks x and batch_size first

    @classmethod
    def from_torchvision(
        cls,
        name: str,
        num_classes: int,
        *,
        small_input: bool = True,
        in_channels: int = 3,
        image_size: int = 32,
        seed: int | None = None,
        **kwargs: Any,
    ) -> _Trainer:
        """An unmodified torchvision model, randomly initialised (nothing is downloaded), cut into blocks by
        :func:`torchvision_blocks`; ``image_size`` is the input's height and width."""
        check_choice("name", name, TORCHVISION_MODELS)
        blocks = build_blocks(name, in_channels=in_channels, small_input=small_input, seed=seed)
        return cls(blocks, num_classes, sample_shape=(in_channels, image_size, image_size), seed=seed, **kwargs)


class BlockwiseFF(_Trainer):
    """Block-wise hybrid training (Scalable FF): one class-goodness head and one optimizer per block, backprop
    inside each block only.

    Args:
        blocks: the network, cut into modules applied in order (e.g. a ResNet's stem and residual blocks).
        num_classes: K, the head's output channels.
        sample_shape: one input sample's shape, e.g. (3, 32, 32); sizes the heads.
        temperature: tau of the class-goodness cross-entropy and of prediction's softmax(g / tau).
        normalize: layer-normalise each detached block output (over all its features, no affine) before the next
            block reads it.
        predict: "mean" of softmax(g / tau) over the blocks, or the "last" block's alone.
        optimizer: "sgd" (momentum 0.9, weight decay 5e-4 unless ``optimizer_options`` say otherwise; lr 0.05),
            "adam" or "adamw" (lr 1e-3), a torch.optim optimizer per block and head.
        lr_schedule: "cosine" (to zero), "step" (x0.1 at 50% and 75%) or "constant", over each ``fit``'s epochs
            (over each block's stage for the greedy schedule), after ``warmup_epochs`` of linear warm-up.
        autocast_dtype: run forwards under ``torch.autocast`` in this dtype (bf16 recommended); parameters,
            optimizer state, goodness and loss stay fp32.
        channels_last: keep image activations and conv weights channels-last (default True).
        backend: the head loss's backend ("auto", "torch", "reference").
        recompute: train torchvision's ResNet basic blocks (no downsample) with the network's largest outputs by
            :func:`recomputing_basic_block_step`: bitwise the same step, their peak 5 output-sized tensors instead of
            7 (that peak is the whole step's), for two more 3x3 convolutions forward each.

    The module's ``state_dict`` holds blocks and heads; ``optimizers[i].state_dict()`` the optimizer states.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        num_classes: int,
        *,
        sample_shape: Sequence[int],
        temperature: float = 1.0,
        normalize: bool = False,
        predict: str = "mean",
        backend: str = "auto",
        recompute: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(blocks, num_classes, sample_shape=sample_shape, **kwargs)
        check_finite_number("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be a positive number; got {temperature!r}")
        check_backend(backend, "class_goodness_loss", "class_goodness")
        self.temperature, self.normalize, self.backend = float(temperature), bool(normalize), backend
        self.predict_mode = check_choice("predict", predict, PREDICT)
        with torch.random.fork_rng(devices=[]):
            if kwargs.get("seed") is not None:
                torch.manual_seed(kwargs["seed"])
            shapes = self.output_shapes()
            heads = nn.ModuleList(self._head(shape) for shape in shapes)
            self.heads = heads.to(self.device, memory_format=self.memory_format)
        largest = max(math.prod(shape) for shape in shapes)
        self.recompute_blocks = [
            i for i, (block, shape) in enumerate(zip(self.blocks, shapes))
            if recompute and math.prod(shape) == largest and plain_basic_block(block)
        ]
        self.optimizers = [
            self.make_optimizer([*block.parameters(), *head.parameters()])
            for block, head in zip(self.blocks, self.heads)
        ]

    def _head(self, shape: tuple[int, ...]) -> nn.Module:
        if len(shape) == 3:
            return nn.Conv2d(shape[0], self.num_classes, 1)
        if len(shape) == 1:
            return nn.Linear(shape[0], self.num_classes)
        raise ValueError(f"a block's output must be (channels, height, width) or (features,); got {shape}")

    def pass_on(self, out: torch.Tensor) -> torch.Tensor:
        """A block's output as the next block's input: detached, optionally layer-normalised."""
        out = out.detach()
        return F.layer_norm(out, out.shape[1:]) if self.normalize else out

    def train_block(self, i: int, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of block i and its head on input h; returns (next input, detached loss)."""
        head = self.heads[i]

        def head_loss(out: torch.Tensor) -> torch.Tensor:
            return class_goodness_loss(
                out, head.weight, head.bias, y, temperature=self.temperature, backend=self.backend, check_finite=False
            )

        if self.recomputes(i, h):
            out, loss = recomputing_basic_block_step(self.blocks[i], h, head_loss)
        else:
            with self.autocast():
                out = self.blocks[i](h)
                loss = head_loss(out)
            loss.backward()
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)
        return self.pass_on(out), loss.detach()

    def recomputes(self, i: int, h: torch.Tensor) -> bool:
        """Whether block i trains by :func:`recomputing_basic_block_step` on input h: one of ``recompute_blocks``,
        in training mode without autocast, on a detached input, every parameter trained, no module hooks."""
        block = self.blocks[i]
        return (
            i in self.recompute_blocks
            and self.autocast_dtype is None
            and all(m.training for m in block.modules())
            and not h.requires_grad
            and all(p.requires_grad for p in block.parameters())
            and not _hooked(block)
        )

    def step_batch(self, x: torch.Tensor, y: torch.Tensor, only: int | None = None) -> list[torch.Tensor]:
        """One step of every block (``only=None``, the simultaneous schedule) or of block ``only`` alone, its input
        computed by the earlier blocks in eval mode without gradients (the greedy schedule). Returns the losses of
        the blocks stepped."""
        h, losses = x, []
        for i in range(len(self.blocks) if only is None else only + 1):
            if only is not None and i < only:
                self.blocks[i].eval()
                with torch.no_grad(), self.autocast():
                    h = self.pass_on(self.blocks[i](h))
                continue
            self.blocks[i].train()
            h, loss = self.train_block(i, h, y)
            losses.append(loss)
        return losses

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int = 10,
        batch_size: int = 128,
        schedule: str = "simultaneous",
        transform: Transform | None = None,
        progress: bool = False,
    ) -> list[list[float]]:
        """Train on x (n, *sample_shape) and labels y (n,); returns each block's mean loss per epoch.

        ``"simultaneous"``: every block steps on every batch, fed the previous block's output from that same step.
        ``"greedy"``: block 1 trains for ``epochs`` epochs, then block 2 on the frozen block 1's outputs, and so on.
        ``transform`` augments each batch on the device (e.g. :func:`crop_flip`).
        """
        from tqdm.auto import tqdm

        check_choice("schedule", schedule, SCHEDULES)
        self.check_data(x, y, batch_size)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive; got {epochs}")
        stages = [None] if schedule == "simultaneous" else list(range(len(self.blocks)))
        history: list[list[float]] = [[] for _ in self.blocks]
        bar = tqdm(total=epochs * len(stages), disable=not progress, desc=f"block-wise {schedule}", unit="epoch")
        for stage in stages:
            trained = list(range(len(self.blocks))) if stage is None else [stage]
            steps = len(self.batches(x.shape[0], batch_size))
            schedulers = self.schedulers([self.optimizers[i] for i in trained], epochs, steps)
            for _ in range(epochs):
                sums = torch.zeros(len(trained), device=self.device)
                batches = self.batches(x.shape[0], batch_size)
                for rows in batches:
                    sums += torch.stack(self.step_batch(*self.batch(x, y, rows, transform), only=stage))
                    for scheduler in schedulers:
                        scheduler.step()
                for i, total in zip(trained, (sums / len(batches)).tolist()):
                    history[i].append(total)
                bar.update()
                bar.set_postfix(loss=f"{history[trained[-1]][-1]:.4f}")
        bar.close()
        self.train()
        return history

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(n, K): the mean over the blocks of softmax(g / tau), or the last block's (``predict="last"``)."""
        self.check_data(x, batch_size=batch_size)
        was_training = self.training
        self.eval()
        first = 0 if self.predict_mode == "mean" else len(self.blocks) - 1
        scores = []
        for chunk in x.split(batch_size):
            h, total = self.prepare(chunk), 0.0
            for i, (block, head) in enumerate(zip(self.blocks, self.heads)):
                with self.autocast():
                    out = block(h)
                if i >= first:
                    g = class_goodness(out, head.weight, head.bias, backend=self.backend, check_finite=False)
                    total = total + torch.softmax(g / self.temperature, dim=1)
                h = self.pass_on(out)
            scores.append(total / (len(self.blocks) - first))
        self.train(was_training)
        return torch.cat(scores)


class BackpropBaseline(_Trainer):
    """The same blocks trained end to end by backprop: global average pooling and a linear classifier on the last
    block, cross-entropy, one optimizer over everything. Options as :class:`BlockwiseFF` (no heads, no temperature).
    """

    def __init__(self, blocks: Sequence[nn.Module], num_classes: int, *, sample_shape: Sequence[int], **kwargs: Any):
        super().__init__(blocks, num_classes, sample_shape=sample_shape, **kwargs)
        last = self.output_shapes()[-1]
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if len(last) == 3 else []
        with torch.random.fork_rng(devices=[]):
            if kwargs.get("seed") is not None:
                torch.manual_seed(kwargs["seed"])
            self.classifier = nn.Sequential(*layers, nn.Linear(last[0], num_classes)).to(self.device)
        self.optimizer = self.make_optimizer(list(self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits."""
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)

    def step_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One end-to-end step; returns the detached loss."""
        with self.autocast():
            loss = F.cross_entropy(self(x).float(), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int = 10,
        batch_size: int = 128,
        transform: Transform | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Train on x and y as :meth:`BlockwiseFF.fit`; returns the mean loss per epoch."""
        from tqdm.auto import tqdm

        self.check_data(x, y, batch_size)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive; got {epochs}")
        (scheduler,) = self.schedulers([self.optimizer], epochs, len(self.batches(x.shape[0], batch_size)))
        history: list[float] = []
        self.train()
        for _ in tqdm(range(epochs), disable=not progress, desc="backprop", unit="epoch"):
            total = torch.zeros((), device=self.device)
            batches = self.batches(x.shape[0], batch_size)
            for rows in batches:
                total += self.step_batch(*self.batch(x, y, rows, transform))
                scheduler.step()
            history.append(float(total) / len(batches))
        return history

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(n, K): softmax of the logits."""
        self.check_data(x, batch_size=batch_size)
        was_training = self.training
        self.eval()
        scores = []
        for chunk in x.split(batch_size):
            with self.autocast():
                scores.append(torch.softmax(self(self.prepare(chunk)).float(), dim=1))
        self.train(was_training)
        return torch.cat(scores)


def plain_basic_block(block: nn.Module) -> bool:
    """Whether ``block`` is torchvision's ResNet ``BasicBlock`` without a downsample branch, built as torchvision
    builds it (bias-free convolutions, affine BatchNorm with running statistics, one in-place ReLU): the block that
    :func:`recomputing_basic_block_step` reproduces op for op."""
    kind = type(block)
    if (kind.__module__, kind.__name__) != ("torchvision.models.resnet", "BasicBlock") or block.downsample is not None:
        return False
    convs, norms = (block.conv1, block.conv2), (block.bn1, block.bn2)
    return (
        set(dict(block.named_children())) == {"conv1", "bn1", "relu", "conv2", "bn2"}
        and all(type(c) is nn.Conv2d and c.bias is None and c.padding_mode == "zeros" for c in convs)
        and all(type(n) is nn.BatchNorm2d and n.affine and n.track_running_stats for n in norms)
        and type(block.relu) is nn.ReLU
        and block.relu.inplace
    )


def _hooked(block: nn.Module) -> bool:
    """Module hooks that only the block's own forward and autograd would run (parameter hooks still run)."""
    from torch.nn.modules import module

    global_hooks = (module._global_forward_hooks, module._global_forward_pre_hooks, module._global_backward_hooks,
                    module._global_backward_pre_hooks)
    return any(global_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in block.modules()
    )


def _batch_norm_train(bn: nn.BatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(x)`` in training mode, the same op with the same running-statistics update as ``_BatchNorm.forward``,
    also returning the batch mean and inverse standard deviation that its backward reads."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return torch.ops.aten.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, factor,
                                            bn.eps)


def _batch_norm_again(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The training-mode output of ``bn`` on a recomputed input, running statistics left alone (bitwise the forward's
    output: the same kernel on the same input)."""
    return torch.ops.aten.native_batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)[0]


def _batch_norm_backward(bn: nn.BatchNorm2d, grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                         invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dweight, dL/dbias): the call autograd's NativeBatchNormBackward0 makes."""
    return torch.ops.aten.native_batch_norm_backward(grad, x, bn.weight, bn.running_mean, bn.running_var, mean,
                                                     invstd, True, bn.eps, [True, True, True])


def _conv_backward(conv: nn.Conv2d, grad: torch.Tensor, x: torch.Tensor, need_input: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dL/dx or None, dL/dweight): the call autograd's ConvolutionBackward0 makes for a bias-free convolution."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [need_input, True, False],
    )
    return grad_x, grad_w


def _relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ReLU's backward (autograd's threshold_backward) written into ``grad``, which the caller owns."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def recomputing_forward(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward of :func:`recomputing_basic_block_step` (running statistics updated): (output, what its
    backward reads besides x and the output: the second convolution's output and both BatchNorms' batch mean and
    inverse standard deviation)."""
    with torch.no_grad():
        c1 = block.conv1(x)
        b1, mean1, invstd1 = _batch_norm_train(block.bn1, c1)
        del c1
        c2 = block.conv2(b1.relu_())
        del b1
        out, mean2, invstd2 = _batch_norm_train(block.bn2, c2)
        out.add_(x).relu_()  # BasicBlock: out += identity; relu (in place)
    return out, [c2, mean1, invstd1, mean2, invstd2]


def recomputing_basic_block_step(
    block: nn.Module, x: torch.Tensor, head_loss: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of a :func:`plain_basic_block` (training mode) and its head's loss, leaving the
    block's parameter gradients where ``loss.backward()`` of ``head_loss(block(x))`` would (parameter hooks run),
    with the same ops, the same running-statistics update and bitwise the same gradients; returns (output, loss).

    Why: autograd keeps x, both convolutions' outputs (BatchNorm's inputs), the first ReLU's output and the block's
    output, and its backward starts with two output-sized gradients in flight: 7 activation-sized tensors, the peak of
    a block-wise step. Here the forward keeps x, the second convolution's output and the block's output; the backward
    runs op by op, writes the ReLU gradients in place and recomputes the first convolution (twice) instead of keeping
    its output and the first ReLU's: at most 5 are alive at once, for two more 3x3 convolutions forward.
    """
    conv1, bn1, conv2, bn2 = block.conv1, block.bn1, block.conv2, block.bn2
    out, kept = recomputing_forward(block, x)
    c2, mean1, invstd1, mean2, invstd2 = kept
    del kept
    leaf = out.detach().requires_grad_()
    loss = head_loss(leaf)
    loss.backward()
    grad, leaf.grad = leaf.grad, None
    del leaf
    with torch.no_grad():
        _relu_backward_(grad, out)
        grad_c2, grad_bn2_w, grad_bn2_b = _batch_norm_backward(bn2, grad, c2, mean2, invstd2)
        del grad, c2
        r1 = _batch_norm_again(bn1, conv1(x)).relu_()
        grad_r1, grad_conv2 = _conv_backward(conv2, grad_c2, r1, need_input=True)
        del grad_c2
        _relu_backward_(grad_r1, r1)
        del r1
        grad_c1, grad_bn1_w, grad_bn1_b = _batch_norm_backward(bn1, grad_r1, conv1(x), mean1, invstd1)
        del grad_r1
        _, grad_conv1 = _conv_backward(conv1, grad_c1, x, need_input=False)
        del grad_c1
    params = [conv1.weight, bn1.weight, bn1.bias, conv2.weight, bn2.weight, bn2.bias]
    grads = [grad_conv1, grad_bn1_w, grad_bn1_b, grad_conv2, grad_bn2_w, grad_bn2_b]
    torch.autograd.backward(params, grads)
    return out, loss


def crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The CIFAR augmentation on a batch: a random crop of the zero-padded images and a random horizontal flip."""
    n, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), device=x.device)
    flip = torch.rand(n, 1, device=x.device) < 0.5
    j = torch.arange(width, device=x.device)
    rows = (torch.arange(height, device=x.device) + dy)[:, :, None]
    cols = (dx + torch.where(flip, width - 1 - j, j))[:, None, :]
    index = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()


def small_cnn_blocks(in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)) -> list[nn.Module]:
    """A CNN small enough to train on the CPU in seconds: conv3x3-BN-ReLU blocks, each after the first starting
    with a 2x2 max-pool (8x8 digits become 8, 4 and 2 pixels wide)."""
    blocks: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip([in_channels, *widths[:-1]], widths)):
        pool = [nn.MaxPool2d(2)] if i else []
        blocks.append(nn.Sequential(*pool, nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                    nn.ReLU(inplace=True)))
    return blocks


def build_blocks(name: str, *, in_channels: int = 3, small_input: bool = True, seed: int | None = None) -> list:
    """The blocks of a named network (``MODELS``), randomly initialised under ``seed``."""
    check_choice("model", name, MODELS)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "small_cnn":
            return small_cnn_blocks(in_channels)
        return torchvision_blocks(name, small_input=small_input, in_channels=in_channels)


def torchvision_blocks(name: str, *, small_input: bool = True, in_channels: int = 3) -> list[nn.Module]:
    """Cut an unmodified torchvision model (random initialisation) into blocks.

    ResNet-18: the stem, then each of the eight residual blocks. MobileNetV3-small: the stem, then groups of
    inverted-residual blocks, a new group at each block that downsamples (the last group ends with the 1x1
    convolution to 576 channels). ``small_input`` (CIFAR-sized images) makes the stem a 3x3 stride-1 convolution
    without the max-pool, as CIFAR ResNets do; ``in_channels`` other than 3 replaces the stem's convolution. The
    classifiers are left out: the trainers put their own heads or classifier on the blocks.
    """
    check_choice("name", name, TORCHVISION_MODELS)
    models = _import_torchvision().models
    if name == "resnet18":
        net = models.resnet18()
        if small_input:
            stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), net.bn1, net.relu)
        else:
            conv1 = net.conv1 if in_channels == 3 else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            stem = nn.Sequential(conv1, net.bn1, net.relu, net.maxpool)
        return [stem, *net.layer1, *net.layer2, *net.layer3, *net.layer4]
    features = list(models.mobilenet_v3_small().features)
    conv = features[0][0]
    if small_input or in_channels != 3:
        features[0][0] = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size,
                                   1 if small_input else conv.stride, conv.padding, bias=False)
    groups: list[list[nn.Module]] = [[features[0]]]
    for module in features[1:]:
        if _downsamples(module) or len(groups) == 1:
            groups.append([])
        groups[-1].append(module)
    return [nn.Sequential(*group) for group in groups]


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


def _import_torchvision():
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            "BlockwiseFF.from_torchvision needs torchvision: pip install 'ff-kernels[vision]' (any torchvision built "
            f"for the installed torch {torch.__version__})"
        ) from err
    except RuntimeError as err:  # a torchvision built for another torch fails while registering its operators
        raise ImportError(
            f"torchvision is installed but does not load beside torch {torch.__version__} ({err}); install the "
            "torchvision release built for this torch"
        ) from err
    return torchvision
