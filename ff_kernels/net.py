"""``FFNet``: a stack of FF layers with label overlay, layer-local training and goodness-based prediction.

It follows the two published recipes: mohammadpz/pytorch_forward_forward (greedy: each layer trained for all its
steps before the next, full batch) and Hinton / loeweX (simultaneous: every layer steps on every batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ff_kernels._options import check_choice
from ff_kernels.nn import FFLinear, check_batch_size, check_targets, is_count, labelled_accuracy
from ff_kernels.optim import OPTIMIZERS, FusedOptimizer
from ff_kernels.types import FFStepOutput

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

OVERLAYS = ("replace", "append")
NEGATIVES = ("wrong", "shuffle")
SCHEDULES = ("greedy", "simultaneous")
COLLABS = ("all", "previous")


class Checkpointed:
    """``save`` and ``load`` for a network that keeps its constructor arguments in ``config`` and one optimizer
    per layer in ``optimizers``: the file holds all three, enough to resume training."""

    config: dict[str, Any]
    optimizers: list[FusedOptimizer]

    def save(self, path: str) -> None:
        """The config, the weights and the optimizer state, enough to resume training."""
        torch.save(
            {
                "config": self.config,
                "state_dict": self.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
            },
            path,
        )

    @classmethod
    def load(cls, path: str, device: torch.device | str | None = None) -> Self:
        """The network ``save`` wrote, on ``device`` (the CPU by default), its optimizers' state restored."""
        saved = torch.load(path, map_location=device or "cpu", weights_only=False)
        net = cls(**saved["config"], device=device)
        net.load_state_dict(saved["state_dict"])
        for opt, state in zip(net.optimizers, saved["optimizers"]):
            opt.load_state_dict(state)
        return net


class FFNet(Checkpointed, nn.Module):
    """An FF network over ``dims = [in_features, hidden_1, ..., hidden_L]``.

    Labels are shown to the network in its input: ``overlay="replace"`` writes a one-hot label over the first
    ``num_classes`` inputs (Hinton, mohammadpz), ``"append"`` appends a one-hot block (better for small inputs
    such as 8x8 digits). The one-hot value is the maximum of the training inputs, as mohammadpz uses.

    Negatives carry a wrong label: ``negatives="wrong"`` draws one uniformly among the wrong labels;
    ``"shuffle"`` is mohammadpz's permutation of the batch's labels, which lets about 1/num_classes of the
    negatives carry their true label.

    Each layer has its own optimizer (``optimizer`` in "adam", "adamw", "sgd", with ``lr`` and
    ``optimizer_options``) and its own FF loss; no gradient crosses layers.

    ``collab`` is Layer Collaboration (Lorberbom et al., AAAI 2024): layer i's logit adds, as a constant offset,
    the goodness of every other layer (``"all"``) or of the earlier layers (``"previous"``) on the same rows.
    ``loss="symba"`` pairs each positive with its own negative (the same sample with a wrong label).
    """

    def __init__(
        self,
        dims: Sequence[int],
        *,
        num_classes: int = 10,
        overlay: str = "replace",
        negatives: str = "wrong",
        threshold: float = 2.0,
        goodness: str = "mean",
        loss: str = "logistic",
        normalize: str = "l2",
        eps: float = 1e-4,
        alpha: float = 4.0,
        optimizer: str = "adam",
        lr: float = 0.03,
        optimizer_options: dict[str, Any] | None = None,
        predict_skip_first: bool = False,
        collab: str | None = None,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dims = list(dims)
        if len(dims) < 2 or not all(is_count(d) for d in dims):
            raise ValueError(
                f"dims must list the input size and at least one layer width, all positive integers; got {dims}"
            )
        dims = [int(d) for d in dims]
        if not is_count(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be at least 2; got {num_classes!r}")
        self.overlay = check_choice("overlay", overlay, OVERLAYS)
        self.negatives = check_choice("negatives", negatives, NEGATIVES)
        if collab is not None:
            check_choice("collab", collab, COLLABS)
        self.collab = collab
        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        if overlay == "replace" and dims[0] < num_classes:
            raise ValueError(
                f"overlay='replace' writes the label over the first {num_classes} inputs but dims[0]={dims[0]}; "
                "use overlay='append'"
            )
        if predict_skip_first and len(dims) < 3:
            raise ValueError("predict_skip_first needs at least two layers")
        self.config = dict(
            dims=dims,
            num_classes=num_classes,
            overlay=overlay,
            negatives=negatives,
            threshold=threshold,
            goodness=goodness,
            loss=loss,
            normalize=normalize,
            eps=eps,
            alpha=alpha,
            optimizer=optimizer,
            lr=lr,
            optimizer_options=dict(optimizer_options or {}),
            predict_skip_first=predict_skip_first,
            collab=collab,
            backend=backend,
            compute_dtype=compute_dtype,
            seed=seed,
        )
        self.num_classes = num_classes
        self.predict_skip_first = predict_skip_first
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        in_dims = [dims[0] + (num_classes if overlay == "append" else 0), *dims[1:-1]]
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.layers = nn.ModuleList(
                FFLinear(
                    d_in,
                    d_out,
                    threshold=threshold,
                    goodness=goodness,
                    loss=loss,
                    normalize=normalize,
                    eps=eps,
                    alpha=alpha,
                    backend=backend,
                    compute_dtype=compute_dtype,
                )
                for d_in, d_out in zip(in_dims, dims[1:])
            )
        self.to(device)
        self.register_buffer("overlay_value", torch.ones((), device=device))
        self.optimizers: list[FusedOptimizer] = [
            OPTIMIZERS[optimizer](list(layer.parameters()), lr=lr, **(optimizer_options or {})) for layer in self.layers
        ]

    @property
    def device(self) -> torch.device:
        return self.layers[0].weight.device

    def overlay_labels(self, x: torch.Tensor, labels: torch.Tensor | int) -> torch.Tensor:
        """x with a one-hot label (scaled to ``overlay_value``) written over or appended to each row."""
        x = x.to(self.device, self.layers[0].weight.dtype)
        one_hot = torch.zeros(x.shape[0], self.num_classes, dtype=x.dtype, device=x.device)
        if isinstance(labels, int):
            one_hot[:, labels] = self.overlay_value
        else:
            one_hot[torch.arange(x.shape[0], device=x.device), labels.to(x.device)] = self.overlay_value.to(x.dtype)
        if self.overlay == "append":
            return torch.cat([x, one_hot], dim=1)
        out = x.clone()
        out[:, : self.num_classes] = one_hot
        return out

    def negative_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Wrong labels for the negatives (see the class docstring for the two strategies)."""
        if self.negatives == "shuffle":
            return labels[torch.randperm(labels.shape[0], generator=self.generator)]
        shift = torch.randint(1, self.num_classes, labels.shape, generator=self.generator)
        return (labels.cpu() + shift) % self.num_classes

    def _check_data(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """The public methods' checks of their data, once per call: x finite rows of dims[0] features, y integer
        labels in range, one per row."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a 2-D tensor (samples, features); got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.config["dims"][0]:
            raise ValueError(f"x has {x.shape[1]} features but dims[0]={self.config['dims'][0]}")
        if x.shape[0] == 0:
            raise ValueError("x is empty")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        if y is not None:
            check_targets(y, x.shape[0], self.num_classes)

    def _batches(self, rows: int, batch_size: int | None) -> list[torch.Tensor] | list[slice]:
        if batch_size is None or batch_size >= rows:
            return [slice(None)]
        order = torch.randperm(rows, generator=self.generator).to(self.device)
        return list(order.split(batch_size))

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int = 1000,
        batch_size: int | None = None,
        schedule: str = "greedy",
        progress: bool = False,
    ) -> list[list[float]]:
        """Train on (x, y). Returns the mean loss of each layer for each epoch.

        ``schedule="greedy"``: layer 1 trains for ``epochs`` epochs, then its outputs (with its final weights)
        feed layer 2, and so on (mohammadpz; with ``batch_size=None`` one epoch is one full-batch step).
        Negative labels are drawn once. ``"simultaneous"``: on every batch each layer steps once, fed the previous
        layer's activations from that same step (Hinton, loeweX); negative labels are drawn anew every epoch.
        """
        from tqdm.auto import tqdm

        check_choice("schedule", schedule, SCHEDULES)
        self._check_data(x, y)
        check_batch_size(batch_size, allow_none=True)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive; got {epochs}")
        self.overlay_value.fill_(float(x.max()))
        y = y.long()
        history: list[list[float]] = [[] for _ in self.layers]
        total = epochs * len(self.layers) if schedule == "greedy" else epochs
        bar = tqdm(total=total, disable=not progress, desc=f"FF {schedule}", unit="epoch")
        if schedule == "greedy":
            h_pos = self.overlay_labels(x, y)
            h_neg = self.overlay_labels(x, self.negative_labels(y))
            prior_pos = prior_neg = None
            for i, layer in enumerate(self.layers):
                for _ in range(epochs):
                    losses = []
                    for rows in self._batches(x.shape[0], batch_size):
                        priors = (None, None) if prior_pos is None else (prior_pos[rows], prior_neg[rows])
                        losses.append(self.step_layer(i, h_pos[rows], h_neg[rows], *priors).loss)
                    history[i].append(float(torch.stack(losses).mean()))
                    bar.update()
                bar.set_postfix(layer=i + 1, loss=f"{history[i][-1]:.4f}")
                if i + 1 < len(self.layers):
                    h_pos, g_pos = layer.forward_with_goodness(h_pos)
                    h_neg, g_neg = layer.forward_with_goodness(h_neg)
                    if self.collab is not None:
                        prior_pos = g_pos if prior_pos is None else prior_pos + g_pos
                        prior_neg = g_neg if prior_neg is None else prior_neg + g_neg
        else:
            for _ in range(epochs):
                x_pos = self.overlay_labels(x, y)
                x_neg = self.overlay_labels(x, self.negative_labels(y))
                sums = [torch.zeros((), device=self.device) for _ in self.layers]
                batches = self._batches(x.shape[0], batch_size)
                for rows in batches:
                    for i, out in enumerate(self.step_all(x_pos[rows], x_neg[rows])):
                        sums[i] += out.loss
                for i in range(len(self.layers)):
                    history[i].append(float(sums[i]) / len(batches))
                bar.update()
                bar.set_postfix(loss=f"{history[-1][-1]:.4f}")
        bar.close()
        return history

    def layer_goodness(self, h: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
        """The goodness of layers ``first``, ``first``+1, ... for ``h``, the input of layer ``first``."""
        goodness = []
        for layer in self.layers[first:]:
            h, g = layer.forward_with_goodness(h)
            goodness.append(g)
        return goodness

    def step_layer(
        self,
        i: int,
        h_pos: torch.Tensor,
        h_neg: torch.Tensor,
        prior_pos: torch.Tensor | None = None,
        prior_neg: torch.Tensor | None = None,
    ) -> FFStepOutput:
        """Greedy schedule: layer ``i`` steps on its inputs (the fixed earlier layers' activations).

        With collaboration its goodness offset is ``prior_*`` (the earlier layers' goodness on these rows, fixed
        while layer i trains) plus, for ``collab="all"``, the later layers' goodness, computed by forwarding this
        layer and the later ones on the batch.
        """
        offset_pos, offset_neg = prior_pos, prior_neg
        if self.collab == "all" and i + 1 < len(self.layers):
            later_pos = torch.stack(self.layer_goodness(h_pos, i)[1:]).sum(0)
            later_neg = torch.stack(self.layer_goodness(h_neg, i)[1:]).sum(0)
            offset_pos = later_pos if offset_pos is None else offset_pos + later_pos
            offset_neg = later_neg if offset_neg is None else offset_neg + later_neg
        return self.layers[i].train_step(
            h_pos, h_neg, self.optimizers[i], offset_pos=offset_pos, offset_neg=offset_neg
        )

    def step_all(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> list[FFStepOutput]:
        """Simultaneous schedule: every layer steps once on this batch of overlaid inputs.

        Layer i is fed layer i-1's activations from its step (computed with its pre-update weights, as one
        forward pass of the network would). Collaboration offsets: ``"previous"`` sums the goodness that the
        earlier layers' steps returned; ``"all"`` also needs the later layers' goodness, so one forward pass with
        goodness over all layers runs first.
        """
        if self.collab == "all":
            goodness_pos, goodness_neg = self.layer_goodness(x_pos), self.layer_goodness(x_neg)
            total_pos, total_neg = torch.stack(goodness_pos).sum(0), torch.stack(goodness_neg).sum(0)
        prior_pos = prior_neg = None
        h_pos, h_neg = x_pos, x_neg
        outs = []
        for i, layer in enumerate(self.layers):
            offset_pos, offset_neg = prior_pos, prior_neg
            if self.collab == "all":
                offset_pos, offset_neg = total_pos - goodness_pos[i], total_neg - goodness_neg[i]
            out = layer.train_step(h_pos, h_neg, self.optimizers[i], offset_pos=offset_pos, offset_neg=offset_neg)
            if self.collab == "previous":
                prior_pos = out.goodness_pos if prior_pos is None else prior_pos + out.goodness_pos
                prior_neg = out.goodness_neg if prior_neg is None else prior_neg + out.goodness_neg
            h_pos, h_neg = out.h_pos, out.h_neg
            outs.append(out)
        return outs

    @torch.no_grad()
    def label_goodness(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """(samples, num_classes): the goodness summed over layers for each candidate label."""
        self._check_data(x)
        check_batch_size(batch_size)
        first = 1 if self.predict_skip_first else 0
        scores = torch.zeros(x.shape[0], self.num_classes, device=self.device)
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size]
            for label in range(self.num_classes):
                h = self.overlay_labels(chunk, label)
                for i, layer in enumerate(self.layers):
                    h, g = layer.forward_with_goodness(h)
                    if i >= first:
                        scores[start : start + chunk.shape[0], label] += g
        return scores

    def predict(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """The label whose overlay gives the highest summed goodness."""
        return self.label_goodness(x, batch_size).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
        return labelled_accuracy(self.predict(x, batch_size), y, self.num_classes)  # checks x first
