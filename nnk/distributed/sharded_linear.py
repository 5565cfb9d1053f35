"""``ShardedCosineLinear``: a cosine classification head whose classes are
sharded over the ranks of a data-parallel group (insightface's Partial FC
pattern): the backbone runs data-parallel (DDP), the head class-parallel.

Per step: the ranks all-gather their features and labels; each rank computes
the partials of its classes for the whole gathered batch; two all-reduces of
O(N) floats give every rank the exact loss of the global batch. The backward
of the features' all-gather is a reduce-scatter: each rank gets the gradient
of its own features, summed over all class shards.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._options import (
    FLOAT_DTYPES, IMPLS, REDUCTIONS, _check_scale, _choice, _finite_float, deterministic_flag, flag, float32_options,
    int_option, invalid_targets,
    make_options,
)
from .._dispatch import autocast_dtype, resolve_impl
from ..inference import logits_topk
from ..modules import CosineLinear, default_scale
from ..reference import acc_dtype
from .collectives import exchange_rows, gather_rows
from .loss import scale_signature, shard_loss
from .partials import LOCAL_IGNORE, local_targets
from .rank_checks import agree, check_partition, group_rank

CALLER = "nnk.distributed.ShardedCosineLinear"


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(class_start, C_local)`` of ``rank``: contiguous shards in rank order,
    the first ``num_classes % world_size`` ranks holding one class more."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + int(rank < extra)


def sample_classes(labels: torch.Tensor, class_start: int, num_local: int, sample_rate: float,
                   ignore_index: int = -100, generator: torch.Generator | None = None):
    """Partial FC's negative sampling of one shard.

    Keeps every class of the shard that is a label of the batch (the
    positives) and fills up to ``ceil(sample_rate * num_local)`` classes with a
    uniform sample of the others (all positives are kept even when they are more).

    Args:
        labels: (N,) int64 global labels of the (gathered) batch.
        class_start, num_local: the shard ``[class_start, class_start + num_local)``.
        sample_rate: in (0, 1].
        ignore_index: label of ignored rows.
        generator: torch.Generator on labels' device for the uniform draw
            (default: the global one).

    Returns:
        ``(classes, local_target)``: (K,) int64 sorted shard-local indices of the
        kept classes, and (N,) int64 targets as indices into ``classes``
        (``LOCAL_IGNORE`` for rows whose class is in another shard or ignored).
    """
    sample_rate = _finite_float("sample_rate", sample_rate, lo=0.0, hi=1.0, lo_open=True)
    local = local_targets(labels, class_start, num_local, ignore_index)
    here = local != LOCAL_IGNORE
    positive = torch.zeros(num_local, dtype=torch.bool, device=labels.device)
    positive[local[here]] = True
    keep = max(int(positive.sum()), math.ceil(sample_rate * num_local))
    # Uniform scores in [0, 1) for the negatives; positives score 2 and always win.
    score = torch.rand(num_local, generator=generator, device=labels.device)
    score[positive] = 2.0
    classes = score.topk(keep).indices.sort().values
    position = torch.full((num_local,), LOCAL_IGNORE, dtype=torch.int64, device=labels.device)
    position[classes] = torch.arange(keep, device=labels.device)
    return classes, torch.where(here, position[local.clamp_min(0)], local)


class ShardedCosineLinear(nn.Module):
    """Class-parallel cosine head with its loss: rank r of ``group`` holds classes
    ``shard_range(num_classes, r, world_size)`` (uneven when C is not divisible).

    ``loss = module(features, labels)`` with this rank's (n_r, in_features)
    features and (n_r,) labels (n_r may differ between ranks; (..., in_features)
    features and labels of their leading shape are flattened) replaces, on every
    rank::

        X = torch.cat(all ranks' features); Y = torch.cat(all ranks' labels)
        nnk.cosine_cross_entropy(X, W, Y, scale=s, bias=b, ...)   # W: all C classes

    and the backward gives ``features`` the gradient of that loss with respect
    to this rank's rows, times the group size when ``ddp_average`` (DDP then
    averages the backbone's gradients over the ranks, which makes them the
    gradient of the global-batch loss, as a single process with the whole batch
    would compute). The head's parameters get exact gradients of their own
    rows; keep this module out of DDP (its parameters differ per rank).
    ``predict(features, k)`` gives each rank the top k of all C classes for
    its rows (a collective too), without gathering the weight.

    Args:
        in_features: D.
        num_classes: C (at least the group size).
        group: the data-parallel process group that also shards the classes
            (None: the default group). Constructed after init_process_group.
        scale: s, > 0 (the initial value when learnt); None:
            :func:`nnk.default_scale` of C and the margins, as ``nnk.CosineLinear``.
            A learnt s is checked (finite, > 0) at each forward.
        learn_scale: make s a parameter (a shared scalar, its gradient summed over
            the ranks, or per class with ``per_class_scale``).
        per_class_scale: learn one scale per class (sharded like the weight);
            implies learn_scale, as in ``nnk.CosineLinear``.
        bias: learn a (C,) bias, sharded.
        normalize_input, normalize_weight, additive_margin, angular_margin, margin_grad, ignore_index,
        label_smoothing, z_loss, reduction, eps, impl, deterministic: as
            :func:`nnk.cosine_cross_entropy` (impl: the local backend).
        sample_rate: in (0, 1]; below 1, in training mode each rank keeps the
            batch's positive classes plus a uniform sample of its other classes
            (Partial FC) and the loss runs over the kept classes only.
            1 (default): all classes, exact. Not combinable with label smoothing.
            The rows left out of a step get a zero gradient, not none, so an
            optimizer with momentum or weight decay still moves them (as in
            insightface's Partial FC v2); an optimizer without momentum and
            weight decay on the head leaves them untouched.
        ddp_average: multiply the features' gradient by the group size (to
            cancel DDP's averaging); False when the backbone's gradients are
            summed over the ranks or the backbone is not data-parallel.
        device, dtype: of the weight and bias (a scale tensor is float32, float64 for float64).

    State: ``state_dict()`` holds this rank's rows and records its class range;
    ``load_state_dict`` accepts only the same range. To change the world size,
    ``load_resharded(states)`` takes the state_dicts of all ranks of any earlier
    sharding (or one ``full_state_dict()``).
    """

    def __init__(self, in_features: int, num_classes: int, group=None, *, scale: float | None = None,
                 learn_scale: bool = False, per_class_scale: bool = False, bias: bool = False,
                 normalize_input: bool = True, normalize_weight: bool = True, additive_margin: float = 0.0, angular_margin: float = 0.0, margin_grad: str = "exact",
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 reduction: str = "mean", eps: float = 1e-12, sample_rate: float = 1.0,
                 ddp_average: bool = True, impl: str = "auto", deterministic: bool | None = None,
                 device=None, dtype=None):
        super().__init__()
        rank, world = group_rank(group, CALLER)
        self.in_features = int_option("in_features", in_features, lo=1)
        self.num_classes = int_option("num_classes", num_classes, lo=1)
        if self.num_classes < world:
            raise ValueError(f"num_classes must be >= the group's {world} ranks (one class per rank at least), "
                             f"got {self.num_classes}")
        self.opts = make_options(
            normalize_input=normalize_input, normalize_weight=normalize_weight, additive_margin=additive_margin,
            angular_margin=angular_margin, margin_grad=margin_grad, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, eps=eps, float32=float32_options(dtype),
        )
        self.reduction = _choice("reduction", reduction, REDUCTIONS)
        self.sample_rate = _finite_float("sample_rate", sample_rate, lo=0.0, hi=1.0, lo_open=True)
        if self.sample_rate < 1.0 and self.opts.label_smoothing:
            raise ValueError("label_smoothing spreads mass over all classes: "
                             "it cannot be combined with sample_rate < 1")
        learn_scale, per_class_scale, bias = (flag(k, v) for k, v in (
            ("learn_scale", learn_scale), ("per_class_scale", per_class_scale), ("bias", bias)))
        learn_scale = learn_scale or per_class_scale
        self.group, self.ddp_average = group, flag("ddp_average", ddp_average)
        self.impl = _choice("impl", impl, IMPLS)
        self.deterministic = None if deterministic is None else flag("deterministic", deterministic)
        self.class_start, self.num_local = shard_range(self.num_classes, rank, world)
        if scale is None:
            scale = default_scale(self.num_classes, additive_margin=self.opts.additive_margin,
                                  angular_margin=self.opts.angular_margin)
        self._scale_init = _finite_float("scale", scale, lo=0.0, lo_open=True, float32=float32_options(dtype))

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.num_local, self.in_features, **factory))
        scale_shape = (self.num_local,) if per_class_scale else ()
        # float32 like nnk's scales (float64 heads keep a float64 scale for gradcheck-grade tests).
        scale_t = torch.empty(scale_shape, device=device, dtype=acc_dtype(dtype))
        self.scale = nn.Parameter(scale_t) if learn_scale else self._scale_init
        self.bias = nn.Parameter(torch.empty(self.num_local, **factory)) if bias else None
        # The state entries that hold one row per class (sharded like the weight).
        self._per_class = ("weight",) + (("scale",) if per_class_scale else ()) + (("bias",) if bias else ())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight rows ~ N(0, 1/D) (unit norm in expectation), drawn from a seed
        taken from the global RNG plus the shard's first class, so that ranks
        seeded alike still draw different classes; scale to its initial value,
        bias to 0."""
        seed = int(torch.randint(0, 2**62, ()).item()) + self.class_start
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.weight.shape, generator=g) / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.copy_(w)
            if isinstance(self.scale, torch.Tensor):
                self.scale.fill_(self._scale_init)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, ddp_average={self.ddp_average}")

    # --- loss -------------------------------------------------------------

    def _check_features(self, features) -> int:
        """Local checks of ``features`` (..., in_features); returns its row count."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() < 1 or features.shape[-1] != self.in_features:
            raise ValueError(f"features must have shape (..., in_features={self.in_features}), "
                             f"got {tuple(features.shape)}")
        if features.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be float16, bfloat16, float32 or float64, got {features.dtype}")
        if features.device != self.weight.device:
            raise ValueError(f"features are on {features.device} but the weight is on {self.weight.device}")
        if isinstance(self.scale, torch.Tensor):
            # A learnt s is stored as it is (not as a log): an optimizer step can
            # take it to <= 0 or NaN, which the loss must refuse as the functional does.
            _check_scale(self.scale.detach(), self.num_local, self.weight.device)
        return math.prod(features.shape[:-1])

    def _head_signature(self) -> dict:
        """What the ranks' heads must share besides num_classes and options:
        the per-class entries (a bias or per-class scale on one rank only
        trained silently), the dtypes of the entries (gathered and reduced
        as bytes) and in_features."""
        dtypes = " ".join(f"{name}:{str(t.dtype).removeprefix('torch.')}"
                          for name, t in self.state_dict().items() if isinstance(t, torch.Tensor))
        return {"head": f"per-class {'+'.join(self._per_class)}, in_features {self.in_features}, {dtypes}"}

    def _describe(self, features, labels):
        n = self._check_features(features)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
        lead = tuple(features.shape[:-1])
        if labels.shape != lead or labels.device != features.device:
            raise ValueError(f"labels must have shape {lead} on {features.device} like features' leading "
                             f"dimensions, got {tuple(labels.shape)} on {labels.device}")
        ii = self.opts.ignore_index
        bad = invalid_targets(labels, self.num_classes, ii)
        if labels.numel() and bool(bad.any()):
            raise ValueError(f"labels must be in [0, {self.num_classes}) or ignore_index={ii}, "
                             f"got {int(labels[bad][0])}")
        deterministic = deterministic_flag(self.deterministic)  # NNK_DETERMINISTIC may be bad on one rank
        return deterministic, {
            "in_features": features.shape[-1], "features.dtype": str(features.dtype),
            "features.requires_grad": features.requires_grad, "num_classes": self.num_classes,
            # The backward reduce-scatters the features' gradient: every rank must record autograd.
            "grad mode": torch.is_grad_enabled(), "training": self.training,
            "impl (resolved)": resolve_impl(self.impl, features.device, features.dtype),
            "options": repr((self.opts, self.reduction, self.sample_rate, self.ddp_average)),
            **scale_signature(self.scale),
            "autocast": autocast_dtype(features.device), "deterministic": deterministic,
            "rows": n, "class_start": self.class_start, "C_local": self.num_local, **self._head_signature(),
        }

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the gathered batch (see the class docstring); the same
        value on every rank. features (..., in_features) float, labels (...)
        int of features' leading shape (a rank's rows are its flattened
        leading dimensions). With ``reduction="none"``: (N,) over the
        gathered rows, in rank order."""
        group = self.group
        _, world = group_rank(group, CALLER)
        same = ("in_features", "features.dtype", "features.requires_grad", "grad mode", "training",
                "impl (resolved)", "num_classes", "options", "shared scale value",
                "shared scale requires_grad", "shared scale dtype", "autocast", "deterministic", "head")
        deterministic, got = agree(CALLER, group, lambda: self._describe(features, labels), same,
                       info=("rows", "class_start", "C_local"))
        check_partition(CALLER, got["class_start"], got["C_local"], self.num_classes)

        # 1. The global batch on every rank (the backward reduce-scatters).
        x = gather_rows(features.reshape(-1, self.in_features), got["rows"], group,
                        grad_scale=world if self.ddp_average else 1.0)
        target = gather_rows(labels.reshape(-1).long(), got["rows"], group)

        # 2. This rank's classes: all of them, or Partial FC's sample.
        weight, scale, bias = self.weight, self.scale, self.bias
        if self.training and self.sample_rate < 1.0:
            classes, local = sample_classes(target, self.class_start, self.num_local, self.sample_rate,
                                            self.opts.ignore_index)
            weight = weight[classes]
            bias = bias[classes] if bias is not None else None
            if isinstance(scale, torch.Tensor) and scale.dim() == 1:
                scale = scale[classes]
        else:
            local = local_targets(target, self.class_start, self.num_local, self.opts.ignore_index)

        # 3. Partials of the shard, combined over the ranks.
        loss, _ = shard_loss(x, weight.to(x.dtype), target, local, scale, bias, self.opts,
                             num_classes=self.num_classes, reduction=self.reduction, impl=self.impl,
                             deterministic=deterministic, group=group)
        return loss

    @torch.no_grad()
    def predict(self, features: torch.Tensor, k: int = 1, *, block_classes: int | None = None):
        """The k best of all C classes for each row of this rank's features
        (..., in_features) and their cosines, as the whole head's
        ``nnk.CosineLinear.predict`` gives them (``to_cosine_linear()``'s,
        without gathering C x D): a collective over the group, every rank
        calling it with its own rows (any count) and the same k.

        The ranks all-gather the features; each ranks the gathered rows
        against its own classes (in tiles, ``block_classes`` columns if given:
        no (N, C_local) logits); an all-to-all sends each rank every rank's
        top k (logit, class, cosine) for its rows, 3 k numbers per row and
        peer, and a merge gives it the top k of its own rows. Classes are ranked by the logits
        ``s_c cos + b_c`` (ties may be ordered differently), over all classes
        whatever ``sample_rate``. Returns ``(classes, cosines)``: (..., k) int64 and
        (..., k) float32 (float64 for float64 features), best first."""
        caller = CALLER + ".predict"
        group = self.group
        rank, world = group_rank(group, caller)

        def describe():
            k_ = int_option("k", k, lo=1, hi=self.num_classes)
            blk = None if block_classes is None else int_option("block_classes", block_classes, lo=1)
            n = self._check_features(features)
            return (k_, blk), {"k": k_, "in_features": features.shape[-1], "features.dtype": str(features.dtype),
                               "num_classes": self.num_classes, "options": repr(self.opts),
                               "autocast": autocast_dtype(features.device), "rows": n,
                               "class_start": self.class_start, "C_local": self.num_local,
                               **scale_signature(self.scale), **self._head_signature()}

        # The ranks' candidates are compared: they must score alike (a bias
        # or a learnt shared scale of one rank's own ranked its classes
        # apart, silently).
        same = ("k", "in_features", "features.dtype", "num_classes", "options", "autocast",
                "shared scale value", "head")
        (k, blk), got = agree(caller, group, describe, same, info=("rows", "class_start", "C_local"))
        check_partition(caller, got["class_start"], got["C_local"], self.num_classes)
        lead, rows = features.shape[:-1], got["rows"]

        # 1. Every rank's rows against this rank's classes.
        x = gather_rows(features.reshape(-1, self.in_features), rows, group)
        o = self.opts
        logits, classes, cosines = logits_topk(
            x, self.weight, k, scale=self.scale, bias=self.bias, normalize_input=o.normalize_input,
            normalize_weight=o.normalize_weight, eps=o.eps, block_classes=blk,
        )
        # 2. One float64 block per row (exact for the float32 / float64 logits
        # and cosines and for class indices below 2^53), padded to k with
        # -inf logits of class C, which rank after every class.
        kl, n_all = classes.shape[1], x.shape[0]
        packed = x.new_empty((n_all, 3, k), dtype=torch.float64)
        packed[:, 0].fill_(-math.inf)
        packed[:, 1].fill_(self.num_classes)
        packed[:, 2].fill_(math.nan)
        packed[:, 0, :kl], packed[:, 1, :kl], packed[:, 2, :kl] = logits, classes + self.class_start, cosines
        # 3. This rank's rows, with every rank's candidates (an all-to-all:
        # O(n k) numbers per rank and peer), merged by logit (descending; NaN
        # first, as topk) then class, by two stable sorts.
        mine = exchange_rows(packed, rows, group)
        cand = mine.permute(1, 2, 0, 3).reshape(rows[rank], 3, world * k)
        by_class = cand[:, 1].argsort(dim=1, stable=True)
        by_logit = cand[:, 0].gather(1, by_class).argsort(dim=1, descending=True, stable=True)
        best = by_class.gather(1, by_logit)[:, :k]
        out_classes = cand[:, 1].gather(1, best).long()
        out_cosines = cand[:, 2].gather(1, best).to(cosines.dtype)
        return out_classes.reshape(*lead, k), out_cosines.reshape(*lead, k)

    # --- state ------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"class_start": self.class_start, "class_count": self.num_local, "num_classes": self.num_classes,
                "in_features": self.in_features}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        if dict(state) != mine:
            a, n = state.get("class_start", 0), state.get("class_count", 0)
            raise ValueError(
                f"{CALLER}: this state_dict holds classes [{a}, {a + n}) of {state.get('num_classes')} "
                f"(in_features={state.get('in_features')}); "
                f"this rank holds [{self.class_start}, {self.class_start + self.num_local}) of {self.num_classes} "
                f"(in_features={self.in_features}): use load_resharded(states) to change the sharding"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Check the class range before any parameter is overwritten.
        if prefix + "_extra_state" in state_dict:
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def full_state_dict(self) -> dict:
        """The state of the whole head (all C classes), on every rank: a
        collective (all-gather) over the group. Loadable with
        ``load_resharded([state])`` on any world size, and with
        ``load_state_dict`` by a world-size-1 module. Holds C x D on every rank."""
        caller = CALLER + ".full_state_dict"
        _, world = group_rank(self.group, caller)
        # The ranks' heads must match before their rows are gathered: a bias,
        # dtype or in_features of one rank's own made gloo abort (SIGABRT), a
        # num_classes of its own returned heads of different sizes.
        _, got = agree(caller, self.group,
                       lambda: (None, {"num_classes": self.num_classes, **self._head_signature(),
                                       "class_start": self.class_start, "C_local": self.num_local}),
                       ("num_classes", "head"), info=("class_start", "C_local"))
        spans = [shard_range(self.num_classes, r, world) for r in range(world)]
        if list(zip(got["class_start"], got["C_local"])) != spans:
            raise ValueError(f"{caller}: the ranks hold classes {list(zip(got['class_start'], got['C_local']))} "
                             f"((start, count) in rank order), not the rank-ordered shards {spans}")
        sizes = [n for _, n in spans]
        full = {}
        for name, t in self.state_dict().items():
            if name in self._per_class:
                full[name] = gather_rows(t, sizes, self.group)
            elif name != "_extra_state":
                full[name] = t.clone()
        full["_extra_state"] = {"class_start": 0, "class_count": self.num_classes, "num_classes": self.num_classes,
                                "in_features": self.in_features}
        return full

    def to_cosine_linear(self) -> CosineLinear:
        """The whole head as one :class:`nnk.CosineLinear` of all C classes (for
        evaluation, ``predict``, export or single-device fine-tuning), on every
        rank: a collective, as :meth:`full_state_dict`, whose tensors it
        takes. Same normalizations, margins, ``margin_grad`` and ``eps``; a
        learnt scale becomes ``log_scale`` (one per class with
        ``per_class_scale``), a fixed one the head's fixed scale. The loss
        options a CosineLinear takes per call (``ignore_index``,
        ``label_smoothing``, ``z_loss``, ``reduction``) are for its
        ``loss()`` calls. New Parameters on the weight's device and dtype
        (``log_scale`` too, as in any CosineLinear: rounded to a 16-bit
        weight's dtype, log s moves by up to half its ulp, so s by up to
        2^-8 ln(s) relative in bfloat16: 0.78% for s in [7.4, 55), 1.6% at
        s = 64, measured 0.51% at s = 30, enough to reorder close classes in
        ``predict``), requiring grad as the sharded head's; holds C x D on
        every rank."""
        full = self.full_state_dict()
        learn = isinstance(self.scale, torch.Tensor)
        if learn:  # log(s) of s <= 0 would be a NaN log_scale, silently
            _check_scale(full["scale"], self.num_classes, self.weight.device)
        o = self.opts
        head = CosineLinear(
            self.in_features, self.num_classes, bias=self.bias is not None, scale=self._scale_init,
            learn_scale=learn, per_class_scale="scale" in self._per_class,
            normalize_input=o.normalize_input, normalize_weight=o.normalize_weight,
            additive_margin=o.additive_margin, angular_margin=o.angular_margin, margin_grad=o.margin_grad,
            eps=o.eps, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(full["weight"])
            if head.bias is not None:
                head.bias.copy_(full["bias"])
            if learn:
                head.log_scale.copy_(full["scale"].log().reshape(head.log_scale.shape))
        for name, p in head.named_parameters():
            p.requires_grad_(getattr(self, name if name != "log_scale" else "scale").requires_grad)
        return head

    def load_resharded(self, states: Sequence[Mapping]) -> None:
        """Load this rank's classes from the ``state_dict()`` of every rank of
        an earlier run on any world size (any order), or from one
        ``full_state_dict()``. No communication: each rank reads the overlap of
        its class range with each state."""
        mine = self.state_dict()
        infos = []
        for i, st in enumerate(states):
            if set(st.keys()) != set(mine.keys()):
                raise ValueError(f"{CALLER}.load_resharded: states[{i}] has keys {sorted(st.keys())}, "
                                 f"this module {sorted(mine.keys())} (same scale/bias options needed)")
            info = st["_extra_state"]
            if (info["num_classes"], info["in_features"]) != (self.num_classes, self.in_features):
                raise ValueError(f"{CALLER}.load_resharded: states[{i}] is a head of {info['num_classes']} classes x "
                                 f"{info['in_features']} features, this one {self.num_classes} x {self.in_features}")
            infos.append((info["class_start"], info["class_count"]))
            for name in self._per_class:
                want = (info["class_count"], *mine[name].shape[1:])
                if tuple(st[name].shape) != want:
                    raise ValueError(f"{CALLER}.load_resharded: states[{i}][{name!r}] has shape "
                                     f"{tuple(st[name].shape)}, its class range needs {want}")
        check_partition(f"{CALLER}.load_resharded", [a for a, _ in infos], [n for _, n in infos], self.num_classes)
        # A learnt scalar scale is one value of the whole head: the states of
        # one run agree on it; states of different runs would load a mixture.
        shared = [name for name in mine if name not in self._per_class and name != "_extra_state"]
        for name in shared:
            first = states[0][name]
            for i, st in enumerate(states[1:], 1):
                a, b = (v.to(first.device, torch.float64) for v in (st[name], first))  # no rounding before comparing
                same = a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
                if not same:  # (NaN equals NaN here: a diverged run's shards still agree)
                    raise ValueError(f"{CALLER}.load_resharded: states[{i}][{name!r}] differs from states[0]'s "
                                     f"({st[name].flatten()[:4].tolist()} vs {first.flatten()[:4].tolist()}): "
                                     "the shards come from different runs or steps")
        lo, hi = self.class_start, self.class_start + self.num_local
        with torch.no_grad():
            for st, (a, n) in zip(states, infos):
                s0, s1 = max(lo, a), min(hi, a + n)
                for name in self._per_class:
                    if s0 < s1:
                        mine[name][s0 - lo:s1 - lo].copy_(st[name][s0 - a:s1 - a])
            for name in shared:
                mine[name].copy_(states[0][name])
