"""Neural-collapse metrics of a model over a DataLoader: the penultimate
features are captured by a forward hook on the classifier head."""
from __future__ import annotations

import torch
from torch import nn

from .metrics import NCMetrics
from .tracker import NCTracker


def _default_head(model: nn.Module) -> nn.Module:
    """The last module with a 2-D weight that is not an embedding (whose
    input is token ids, not features: a weight-tied LM may register it after
    its head)."""
    heads = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and m.weight.dim() == 2 and not isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if not heads:
        raise ValueError("model has no module with a 2-D weight (nn.Linear-like head): pass head=")
    return heads[-1]


def _bar(iterable, desc: str, progress: bool):
    """``iterable`` with a tqdm progress bar when asked for and tqdm is
    installed (it is not one of nnk's dependencies)."""
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, desc=desc)
    return iterable


@torch.no_grad()
def collect_nc_metrics(
    model: nn.Module,
    loader,
    num_classes: int,
    *,
    head: nn.Module | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    nc4: bool = True,
    device=None,
    ignore_index: int | None = -100,
    progress: bool = True,
    impl: str = "auto",
    all_reduce: bool = False,
    group=None,
) -> NCMetrics:
    """Run ``model`` over ``loader`` in eval mode and return its NC metrics.

    The input of ``head`` (the penultimate features, reshaped to (n, D) with D
    its last dimension; the labels to (n,)) is captured with a forward hook and
    streamed into an :class:`NCTracker`; with ``nc4`` and a classifier, a
    second pass over ``loader`` counts NC4.

    Args:
        model: the network; called as ``model(inputs)``.
        loader: iterable of ``(inputs, labels, ...)`` batches (a DataLoader).
        num_classes: K.
        head: the classifier module whose input are the features; default the
            last module (in ``model.modules()`` order) with a 2-D ``weight``
            that is not an ``nn.Embedding`` / ``nn.EmbeddingBag``.
        weight, bias: the classifier for NC2/NC3/NC4; default ``head.weight`` /
            ``head.bias`` when the head has them. For an :class:`nnk.CosineLinear`
            head (weight not given) NC2/NC3 take the normalized rows
            ``normalize(W)`` when it normalizes its weight (the class directions
            it predicts with, as the demo measures), and NC4 the head's own
            prediction, the argmax of its output ``s cos + b``: not a linear map
            of h, with a bias or per-class scales.
        nc4: take the second pass for NC4 (needs a weight, and a loader that
            can be iterated twice over the same samples).
        device: where inputs go; default the device of the model's parameters.
        ignore_index: samples whose label equals it (padding tokens of an LM
            batch, as ``F.cross_entropy``'s default -100 marks them) are dropped
            from both passes, features with their labels; None keeps every sample.
        progress: show tqdm progress bars (when tqdm is installed).
        impl: backend of the statistics (see :func:`nnk.nc_stats`).
        all_reduce: data-parallel run: merge the ranks' statistics (and NC4
            counts) with :meth:`NCTracker.all_reduce` over ``group``; every
            rank then returns the metrics of all ranks' samples. A rank whose
            loader is empty takes part with no samples (D from the weight or
            the head's ``in_features``).

    Returns:
        :class:`NCMetrics`. The model's training mode is restored afterwards.

    Raises:
        ValueError: the loader yielded no batches (and no rank of an
        all_reduce run could merge them), or its second pass (NC4) did not
        yield as many samples as the first.
    """
    from ..modules import CosineLinear

    head = _default_head(model) if head is None else head
    # A CosineLinear predicts with s_k cos(h, w_k) + b_k: NC4 counts its
    # output's argmax (argmax normalize(W) h + b weighed the bias against
    # |h| instead of s, and left out per-class scales: nc4 0.69 for 0.75).
    own_prediction = weight is None and isinstance(head, CosineLinear)
    if weight is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        weight = head.weight
        if isinstance(head, CosineLinear) and head.normalize_weight:
            weight = torch.nn.functional.normalize(weight.float() if weight.dtype in (torch.float16, torch.bfloat16)
                                                   else weight, dim=1, eps=head.eps)
        if bias is None and isinstance(getattr(head, "bias", None), torch.Tensor):
            bias = head.bias
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    # Linear-like heads act on the last dimension: (B, T, D) inputs are B T
    # samples. The output only when NC4 takes the head's own prediction.
    hook = head.register_forward_hook(lambda mod, args, out: captured.append(
        (args[0].detach().reshape(-1, args[0].shape[-1]), out.detach() if own_prediction else None)))
    was_training = model.training
    model.eval()
    tracker: NCTracker | None = None

    def features_of(batch, nc4_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The head's input rows, their labels and, in the NC4 pass of a head
        predicting on its own (own_prediction), its predictions."""
        inputs, labels = batch[0], batch[1]
        captured.clear()
        model(inputs.to(device))
        if len(captured) != 1:
            raise RuntimeError(f"the head ran {len(captured)} times in one forward; expected once")
        h, out = captured[0]
        captured.clear()
        # (..., C) logits: reshape(-1, C), not (rows, -1), which an empty batch makes ambiguous.
        predicted = out.reshape(-1, out.shape[-1]).argmax(-1) if nc4_pass and out is not None else None
        if not h.is_floating_point():
            raise TypeError(f"the head's input is {h.dtype}, not features: the hooked module is a "
                            f"{type(head).__name__}; pass head= (the classifier whose input are the features)")
        labels = labels.to(device)
        if labels.numel() != h.shape[0]:
            return h, labels, predicted  # NCTracker.update names the mismatch
        labels = labels.reshape(-1)
        if ignore_index is None:
            return h, labels, predicted
        # The hook sees every position of the batch: the padded ones are
        # dropped here, where features and labels are still paired.
        keep = labels != ignore_index
        return h[keep], labels[keep], None if predicted is None else predicted[keep]

    try:
        for batch in _bar(loader, "NC statistics", progress):
            h, y, _ = features_of(batch)
            if tracker is None:
                tracker = NCTracker(num_classes, h.shape[1], h.device, impl=impl)
            tracker.update(h, y)
        if tracker is None:
            dim = weight.shape[-1] if weight is not None else getattr(head, "in_features", None)
            if not (all_reduce and isinstance(dim, int)):
                raise ValueError("loader yielded no batches")
            # A rank without data still joins the collectives (its peers would
            # wait for it), with empty statistics of the head's D.
            tracker = NCTracker(num_classes, dim, device, impl=impl)
        if all_reduce:
            tracker.all_reduce(group)
        if nc4 and weight is not None:
            tracker.begin_nc4(weight.to(tracker.device), None if bias is None else bias.to(tracker.device))
            for batch in _bar(loader, "NC4 (second pass)", progress):
                h, _, predicted = features_of(batch, nc4_pass=True)
                tracker.update_nc4(h, predicted)
            if all_reduce:
                tracker.all_reduce(group)
            # After the merge both counts are global: every rank raises alike.
            if tracker.nc4_samples != tracker.n:
                raise ValueError(
                    f"the second pass over loader (NC4) saw {tracker.nc4_samples} samples, the first "
                    f"{tracker.n}: NC4 needs a loader that yields the same samples on every iteration "
                    "(a DataLoader or a list, not a one-shot iterator), or nc4=False")
        return tracker.metrics(weight.to(tracker.device) if weight is not None else None)
    finally:
        hook.remove()
        model.train(was_training)
