"""Drop-in modules: a cosine classification head that replaces the ``nn.Linear``
at the end of a network, and a loss module for weights owned elsewhere.

The modules hold parameters and options only; the math is
:func:`nnk.cosine_cross_entropy` (training loss, fused), :func:`nnk.cosine_logits`
(forward) and :func:`nnk.cosine_topk` (predict).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._options import (IMPLS, MAX_ANGULAR_MARGIN, REDUCTIONS, _choice, _finite_float, check_target_dtype, flag,
                       float32_options, int_option, make_options)
from .functional import cosine_cross_entropy, cosine_logits, cosine_topk
from .impl.torch_blockwise import TILE_ELEMENTS  # the blockwise path's tile size
from .reference import row_normalize_ref

__all__ = [
    "CosineCrossEntropyLoss",
    "CosineLinear",
    "default_scale",
    "project_after_step",
    "replace_head",
]

# Probability of the target class that the default scale lets a perfectly
# collapsed head reach (see default_scale).
DEFAULT_TARGET_PROB = 0.999


def default_scale(
    num_classes: int,
    *,
    additive_margin: float = 0.0,
    angular_margin: float = 0.0,
    target_prob: float = DEFAULT_TARGET_PROB,
) -> float:
    """The scale ``s`` that CosineLinear uses when none is given.

    A cosine head's logits are bounded by ``s``, so its softmax cannot reach a
    target probability above a ceiling set by ``s`` and the number of classes C
    (NormFace, Wang et al. 2017, Prop. 2; CosFace, Wang et al. 2018, eq. 6).
    The best geometry for the loss is a simplex ETF: the target cosine is 1
    (``cos(angular_margin) - additive_margin`` after the margins) and every
    other cosine is ``-1/(C-1)``, a logit gap of
    ``g = cos(angular_margin) - additive_margin + 1/(C-1)``. The target
    probability ``1 / (1 + (C-1) exp(-s g))`` reaches ``target_prob`` when::

        s = log((C - 1) * target_prob / (1 - target_prob)) / g

    With ``target_prob=0.999`` and no margin: C=10 -> 8.2, 1000 -> 13.8,
    10^5 -> 18.4, 10^6 -> 20.7 (pytorch-metric-learning's normalized softmax
    uses 20); CosFace's m=0.35 at 10^5 classes -> 28.3. This is a floor: a
    head whose features are not fully collapsed needs more, which is why face
    recognition recipes use s=64 with margins; pass ``scale=`` to choose.
    C=1 returns 1.0 (the loss is constant).

    Raises:
        ValueError: margins so large that the target cannot win even at the
            ETF (``g <= 0``); ``num_classes`` below 1, ``target_prob``
            outside (0, 1), a margin not finite or an angular margin outside
            [0, pi] (as nnk.cosine_cross_entropy).
        TypeError: a non-integer ``num_classes`` or a non-real margin.
    """
    num_classes = int_option("num_classes", num_classes, lo=1)
    additive_margin = _finite_float("additive_margin", additive_margin, float32=False)
    angular_margin = _finite_float("angular_margin", angular_margin, lo=0.0, hi=MAX_ANGULAR_MARGIN, float32=False)
    target_prob = _finite_float("target_prob", target_prob, float32=False)
    if not 0.0 < target_prob < 1.0:
        raise ValueError(f"target_prob must be in (0, 1), got {target_prob}")
    if num_classes < 2:
        return 1.0
    gap = math.cos(angular_margin) - additive_margin + 1.0 / (num_classes - 1)
    if gap <= 0.0:
        raise ValueError(
            f"additive_margin={additive_margin} and angular_margin={angular_margin} leave no "
            "positive logit gap even for collapsed features; pass scale= explicitly"
        )
    return math.log((num_classes - 1) * target_prob / (1.0 - target_prob)) / gap


# --- option checks and leading dims -------------------------------------------

_LOSS_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(cosine_cross_entropy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


# The loss options make_options checks (deterministic and float32 are set below).
_OPTION_FIELDS = tuple(k for k in inspect.signature(make_options).parameters if k not in ("deterministic", "float32"))


def _check_loss_options(options: dict) -> None:
    """CosineCrossEntropyLoss's options, checked at construction: unknown names
    are a TypeError, bad values nnk.cosine_cross_entropy's ValueError/TypeError."""
    for name in options:
        if name == "bias":
            raise TypeError("CosineCrossEntropyLoss: bias is an argument of forward, not an option")
        if name not in _LOSS_OPTIONS:
            raise TypeError(
                f"CosineCrossEntropyLoss: unknown option {name!r}; nnk.cosine_cross_entropy takes "
                + ", ".join(n for n in _LOSS_OPTIONS if n != "bias")
            )
    merged = {**_LOSS_OPTIONS, **options}
    for name in ("return_lse", "check_finite"):
        flag(name, merged[name])
    # The dtype is not known yet: float32's range is checked per call.
    make_options(**{k: merged[k] for k in _OPTION_FIELDS},
                 deterministic=merged["deterministic"] is not None and merged["deterministic"], float32=False)
    _choice("reduction", merged["reduction"], REDUCTIONS)
    _choice("impl", merged["impl"], IMPLS)
    if not isinstance(merged["scale"], torch.Tensor):  # a tensor is checked per call (needs C)
        _finite_float("scale", merged["scale"], lo=0.0, lo_open=True, float32=False)


def _loss_any_dims(x, weight, target, **kwargs):
    """nnk.cosine_cross_entropy on x (..., D) and target (...): the leading dims
    are flattened into rows, and ``reduction="none"`` / the lse get them back."""
    if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("x and target must be torch.Tensors")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1 features (a row of none has no direction, "
                         f"hence no cosine), got {tuple(x.shape)}")
    check_target_dtype(target)  # before the shape: (N, C) soft targets are a dtype matter
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"target must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}"
        )
    out = cosine_cross_entropy(x.reshape(-1, x.shape[-1]), weight, target.reshape(-1), **kwargs)
    lead = target.shape
    if kwargs.get("return_lse", False):
        loss, lse = out
        return (loss.reshape(lead) if loss.dim() else loss), lse.reshape(lead)
    return out.reshape(lead) if out.dim() else out


# --- the head -----------------------------------------------------------------

# Options that CosineLinear.loss takes from the module (its forward uses them too).
_MODULE_OWNED = ("scale", "bias", "normalize_input", "normalize_weight", "eps")


def _check_features(x, in_features: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")


def _check_parameter(module: nn.Module, name: str, caller: str, what: str, why: str) -> None:
    """A TypeError when ``module.<name>`` is computed rather than a Parameter:
    by a parametrization (torch.nn.utils.parametrizations.weight_norm, ...) or
    the forward pre-hook of pruning or the older torch.nn.utils.weight_norm /
    spectral_norm. ``what`` names the module in the remedy, ``why`` says what
    ``caller`` needs the Parameter itself for."""
    how = None
    if parametrize.is_parametrized(module, name):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
        how = (f"a parametrization ({kinds})", f"torch.nn.utils.parametrize.remove_parametrizations({what}, {name!r})")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == name:
            fn = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            how = (f"torch.nn.utils.{fn}'s hook", f"torch.nn.utils.remove_{fn}({what}, {name!r})")
        elif isinstance(hook, BasePruningMethod) and hook._tensor_name == name:
            how = ("torch.nn.utils.prune's hook", f"torch.nn.utils.prune.remove({what}, {name!r})")
    if how is not None:
        raise TypeError(f"{caller}: {what}.{name} is computed by {how[0]}, not a Parameter ({why}); remove it "
                        f"first with {how[1]}, which keeps its current value")


# The forward pre-hooks that compute a parameter from others (pruning, the
# older weight_norm and spectral_norm). forward runs them through
# nn.Module.__call__; CosineLinear.loss and predict, which bypass it, run them
# too: they read the weight the last forward had computed (a pruned head's
# loss failed on its second step, "backward through the graph a second time";
# predict ranked by stale weights).
_COMPUTING_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


# Why project_weight_ needs the weight Parameter itself.
_COMPUTED_WEIGHT = "renormalizing the computed tensor would not change what it is computed from"


# One leaf of torch.fx.symbolic_trace (tools such as torchvision's feature
# extraction trace through user modules): its checks and the reshape to x's
# leading dimensions need real tensors, not fx proxies.
torch.fx.wrap("cosine_logits")


class CosineLinear(nn.Linear):
    """A cosine classification head: ``nn.Linear``'s ``weight`` (C, D) and
    ``bias`` (C,), with logits ``scale * cos(x, weight_c) + bias_c``.

    Replaces ``nn.Linear(in_features, out_features)``; ``forward`` computes
    ``scale * (F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T) + bias``
    (either normalization can be switched off), in float32 (float64 for
    float64 input) whatever the parameters' dtype, for x of shape (..., D)
    (a float32 weight is normalized in float32 all the same: float64 x on a
    float32 head gets float64 logits accurate to ~1e-8; ``head.double()``
    for float64's accuracy).
    Train with :meth:`loss`, the fused cross-entropy with the margins, which
    never materializes the (N, C) logits; rank classes with :meth:`predict`.

    Args:
        in_features: D.
        out_features: C, the number of classes.
        bias: learn a (C,) bias (default False: cosine heads usually have none).
        scale: s, the logit scale (inverse temperature). Default
            :func:`default_scale` of C and the margins (8.2 for 10 classes,
            13.8 for 1000, 20.7 for 10^6 without margins); see there.
        learn_scale: make s a learnable parameter (initialized at ``scale``).
        per_class_scale: make s a learnable (C,) parameter, one per class
            (nGPT's s_z); implies ``learn_scale``.
        normalize_input: L2-normalize x's rows.
        normalize_weight: L2-normalize the weight rows.
        additive_margin: CosFace m, applied by :meth:`loss` only.
        angular_margin: ArcFace m in radians, applied by :meth:`loss` only.
        margin_grad: ``"exact"`` or ``"detached"``; see nnk.cosine_cross_entropy.
        eps: lower bound on the norms, as ``F.normalize``.
        device, dtype: of the parameters, as ``nn.Linear``.

    A learnable scale is stored as ``log_scale`` (shape (1,), or (C,) per
    class) and read as ``scale = log_scale.exp()`` (0-d, or (C,)): positive
    by construction, and its gradient steps are relative. (1,) rather than ():
    FSDP2's ``fully_shard`` refuses 0-d parameters; a 0-d ``log_scale`` of an
    older checkpoint still loads. Exclude it from weight decay, which would
    pull s toward 1. ``log_scale`` takes the parameters' dtype: in bfloat16
    its spacing near ln s is 2^-6 for s in [7.4, 55), 2^-5 up to 2981 (ln 20
    = 2.996 is stored as 3.0, s = 20.09), and optimizer steps below half of
    it round away (AdamW at lr 1e-3 leaves it unchanged); keep float32 master
    weights (autocast, or an optimizer's float32 copy) to learn s in a
    bfloat16 model.

    ``state_dict``: with a fixed scale the keys are exactly nn.Linear's
    (``weight``, and ``bias`` when present): it loads into an nn.Linear of the
    same shape and takes one's, both strictly. The fixed scale and the margins
    are constructor arguments, not state. A learnable scale adds the key
    ``log_scale``; such a module still loads an nn.Linear state_dict strictly
    (a state holding this head's weight but no ``log_scale`` gives it the
    initial scale, as ``reset_parameters``, on the weight's device: also after
    ``to_empty`` or with ``assign=True`` on a module built on the meta device;
    a state without the head leaves the scale alone), while an nn.Linear
    loads its state_dict only with ``strict=False`` (``log_scale`` is
    unexpected there).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        scale: float | None = None,
        learn_scale: bool = False,
        per_class_scale: bool = False,
        normalize_input: bool = True,
        normalize_weight: bool = True,
        additive_margin: float = 0.0,
        angular_margin: float = 0.0,
        margin_grad: str = "exact",
        eps: float = 1e-12,
        device=None,
        dtype=None,
    ):
        # First: the default scale below is computed from out_features.
        in_features = int_option("in_features", in_features, lo=1)
        out_features = int_option("out_features", out_features, lo=1)
        f32 = float32_options(dtype)
        opts = make_options(
            normalize_input=normalize_input, normalize_weight=normalize_weight,
            additive_margin=additive_margin, angular_margin=angular_margin,
            margin_grad=margin_grad, ignore_index=-100, label_smoothing=0.0,
            z_loss=0.0, eps=eps, float32=f32,
        )
        if scale is None:
            scale = default_scale(out_features, additive_margin=opts.additive_margin,
                                  angular_margin=opts.angular_margin)
        else:
            scale = _finite_float("scale", scale, lo=0.0, lo_open=True, float32=f32)
        bias = flag("bias", bias)
        per_class_scale = flag("per_class_scale", per_class_scale)
        learn_scale = flag("learn_scale", learn_scale)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.init_scale = float(scale)
        self.learn_scale = learn_scale or per_class_scale
        self.per_class_scale = per_class_scale
        self.normalize_input, self.normalize_weight = opts.normalize_input, opts.normalize_weight
        self.additive_margin, self.angular_margin = opts.additive_margin, opts.angular_margin
        self.margin_grad, self.eps = opts.margin_grad, opts.eps
        if self.learn_scale:
            self.log_scale = self._new_log_scale(self.weight.device, self.weight.dtype)
        else:
            self.register_parameter("log_scale", None)

    def _new_log_scale(self, device, dtype) -> nn.Parameter:
        shape = (self.out_features,) if self.per_class_scale else (1,)
        return nn.Parameter(torch.full(shape, math.log(self.init_scale), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "log_scale", None) is not None:  # None inside nn.Linear.__init__
            with torch.no_grad():
                self.log_scale.fill_(math.log(self.init_scale))

    @property
    def scale(self) -> float | torch.Tensor:
        """s: the fixed float, or ``log_scale.exp()`` (shape () or (C,)), float32
        (float64 for a float64 ``log_scale``) whatever the parameter's dtype."""
        if self.log_scale is None:
            return self.init_scale
        # exp in the accumulation dtype: rounded to a 16-bit parameter's dtype,
        # s would be off by up to 2^-9 relative (bfloat16), a loss error of
        # ~1e-2 at s = 30. Its gradient still comes back in log_scale's dtype.
        # (promote_types, not a comparison: under torch.fx.symbolic_trace the
        # dtype is a proxy, which cannot be branched on.)
        s = self.log_scale.to(torch.promote_types(self.log_scale.dtype, torch.float32)).exp()
        return s if self.per_class_scale else s.reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., C) = ``scale * cos + bias`` for x (..., D), without
        margins; float32 (float64 for float64 x), with or without bias, also
        under torch.autocast (whose dtype the cosine GEMM then runs in, so the
        cosines carry its rounding: about 2^-9 relative in bfloat16)."""
        return cosine_logits(x, self.weight, scale=self.scale, bias=self.bias, normalize_input=self.normalize_input,
                             normalize_weight=self.normalize_weight, eps=self.eps)

    def loss(self, x: torch.Tensor, target: torch.Tensor, **kwargs):
        """The fused cross-entropy of this head on x (..., D) and target (...):
        ``nnk.cosine_cross_entropy(x, self.weight, target, scale=self.scale,
        bias=self.bias, <the module's normalizations, margins, eps>, **kwargs)``,
        without materializing the logits. x has the weight's dtype (unlike
        ``forward``, which upcasts; under torch.autocast both are cast); target
        is int64 or int32 class indices in [0, C) or ignore_index.

        kwargs: the other options of nnk.cosine_cross_entropy (ignore_index,
        label_smoothing, reduction, z_loss, return_lse, impl, deterministic),
        and the margins to override the module's for this call (a margin
        schedule). ``reduction="none"`` and the lse have target's shape.
        The forward pre-hooks that compute the weight or bias (pruning, the
        older weight_norm and spectral_norm) run first, as in forward; so do
        they in ``predict``.

        Raises a TypeError for x of another dtype than the weight outside
        torch.autocast (no silent cast), and a ValueError for x not of shape
        (..., in_features).
        """
        if "weight" in kwargs:
            raise TypeError("CosineLinear.loss: weight is the module's own (C, D) class rows, not an argument "
                            "(for class rows held elsewhere use nnk.CosineCrossEntropyLoss or "
                            "nnk.cosine_cross_entropy); F.cross_entropy's per-class loss weights are not supported")
        for name in _MODULE_OWNED:  # the functional checks the rest
            if name in kwargs:
                raise TypeError(f"CosineLinear.loss: {name} is set by the module, not per call")
        # x first: the functional would blame the weight for x's width.
        _check_features(x, self.in_features)
        dev = x.device.type
        if x.dtype != self.weight.dtype and (dev == "meta" or not torch.is_autocast_enabled(dev)):
            raise TypeError(
                f"CosineLinear.loss: x is {x.dtype} but the head's weight is {self.weight.dtype}; cast x "
                f"(x.to({self.weight.dtype})) or, for 16/32-bit x and weight, call the loss under "
                "torch.autocast, which casts both to its dtype"
            )
        self._compute_parameters(x)
        opts = dict(
            normalize_input=self.normalize_input, normalize_weight=self.normalize_weight,
            additive_margin=self.additive_margin, angular_margin=self.angular_margin,
            margin_grad=self.margin_grad, eps=self.eps,
        )
        opts.update(kwargs)
        return _loss_any_dims(x, self.weight, target, scale=self.scale, bias=self.bias, **opts)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 1, *, block_classes: int | None = None):
        """The k best classes of each row of x (..., D) and their cosines,
        without the (N, C) logits: rows x classes are scored in tiles of
        about 2^21 logits and 2^21 weight entries (up to 1024 rows;
        ``block_classes`` columns if given), each tile's top-k merged into a
        running top-k per row. Extra memory O(tile + N k), whatever C.

        Classes are ranked by the logits, as ``self(x).topk(k)`` ranks them
        (with a scalar scale and no bias: by cosine). Returns
        ``(classes, cosines)``: (..., k) int64 and (..., k) float32 (float64
        for float64 x), best first. Ties may be ordered differently from topk.
        """
        self._compute_parameters(x)
        return cosine_topk(x, self.weight, k, scale=self.scale, bias=self.bias, normalize_input=self.normalize_input,
                           normalize_weight=self.normalize_weight, eps=self.eps, block_classes=block_classes)

    def _compute_parameters(self, x: torch.Tensor) -> None:
        """Run the forward pre-hooks that compute the weight or bias
        (_COMPUTING_HOOKS), in their order, as forward would."""
        for hook in self._forward_pre_hooks.values():
            if isinstance(hook, _COMPUTING_HOOKS):
                hook(self, (x,))

    @torch.no_grad()
    def project_weight_(self) -> "CosineLinear":
        """Renormalize the weight rows to unit L2 norm, in place (the retraction
        applied after each optimizer step by the normalized neural-collapse
        paper's code and by nGPT). Zero rows stay zero. Returns self.

        Raises a TypeError when the weight is computed (a parametrization
        such as weight_norm): renormalizing that tensor would change nothing."""
        _check_parameter(self, "weight", "project_weight_", "head", _COMPUTED_WEIGHT)
        step = max(1, TILE_ELEMENTS // self.in_features)  # bounded temporary
        for c0 in range(0, self.out_features, step):
            rows = self.weight[c0:c0 + step]
            rows.copy_(row_normalize_ref(rows, self.eps)[0])
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "CosineLinear":
        """A CosineLinear holding ``linear``'s own ``weight`` and ``bias``
        Parameter objects (no copy: optimizers that hold them keep working,
        and the class directions, hence the argmax of the cosines, are kept).

        kwargs: CosineLinear's keyword arguments. ``bias=False`` drops
        linear's bias; ``bias=True`` on a bias-free linear adds a zero bias.
        The default keeps the bias if linear has one (its values are in the
        old logit units: consider ``bias=False`` for a trained head). A
        learnable scale is a new parameter: add it to the optimizer.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, CosineLinear):
            raise TypeError("linear is already a CosineLinear")
        if isinstance(linear, nn.modules.lazy.LazyModuleMixin) and linear.has_uninitialized_params():
            raise ValueError(f"linear is an uninitialized {type(linear).__name__}: its in_features are not "
                             "known yet; run one forward pass through the model first")
        for name in ("device", "dtype"):
            if name in kwargs:
                raise TypeError(f"from_linear: {name} comes from linear's weight")
        want_bias = kwargs.pop("bias", linear.bias is not None)
        for name in ("weight", "bias") if want_bias else ("weight",):
            _check_parameter(linear, name, "from_linear", "linear", "the head takes linear's Parameters themselves")
        w = linear.weight
        head = cls(linear.in_features, linear.out_features, bias=want_bias,
                   device="meta", dtype=w.dtype, **kwargs)
        head.weight = w
        if want_bias:
            head.bias = linear.bias if linear.bias is not None else nn.Parameter(
                torch.zeros(linear.out_features, device=w.device, dtype=w.dtype))
        if head.log_scale is not None:
            head.log_scale = head._new_log_scale(w.device, w.dtype)
        return head

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.log_scale is None:
            s += f", scale={self.init_scale:.4g} (fixed)"
        elif self.per_class_scale:
            s += f", scale=per-class learned (init {self.init_scale:.4g})"
        elif self.log_scale.device.type == "meta":  # no value yet (deferred initialization)
            s += f", scale=learned (init {self.init_scale:.4g})"
        else:  # the current value: a loaded or trained scale, not the constructor's
            s += f", scale={float(self.scale.detach()):.4g} (learned, init {self.init_scale:.4g})"
        if not self.normalize_input:
            s += ", normalize_input=False"
        if not self.normalize_weight:
            s += ", normalize_weight=False"
        if self.additive_margin:
            s += f", additive_margin={self.additive_margin}"
        if self.angular_margin:
            s += f", angular_margin={self.angular_margin}, margin_grad={self.margin_grad!r}"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # A shared log_scale was 0-d before it became (1,) (FSDP2).
        old = state_dict.get(prefix + "log_scale")
        if isinstance(old, torch.Tensor) and old.dim() == 0 and self.log_scale is not None \
                and not self.per_class_scale:
            state_dict[prefix + "log_scale"] = old.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # A state of this head without log_scale (nn.Linear's, a fixed-scale
        # head's): the initial scale, as reset_parameters sets it. The current
        # value may be uninitialized memory (to_empty) or none at all (a meta
        # tensor, which assign=True would otherwise keep beside the assigned
        # weight). A state without this head at all (a backbone's, loaded with
        # strict=False) leaves the scale alone and reports it missing.
        if prefix + "log_scale" in missing_keys and prefix + "weight" in state_dict:
            missing_keys.remove(prefix + "log_scale")
            w = self.weight
            if self.log_scale.device == w.device:
                with torch.no_grad():  # in place: an optimizer holding the parameter keeps it
                    self.log_scale.fill_(math.log(self.init_scale))
            else:
                self.log_scale = self._new_log_scale(w.device, w.dtype)


def replace_head(model: nn.Module, path: str, **kwargs) -> CosineLinear:
    """Replace the ``nn.Linear`` at ``path`` in ``model`` (a dotted path as in
    ``model.get_submodule``: ``"fc"``, ``"heads.head"``, ``"classifier.6"``)
    with ``CosineLinear.from_linear(old, **kwargs)``, in place. It keeps the
    old Parameter objects (see from_linear). Returns the new head."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a str (a dotted module path such as \"fc\"), got {type(path).__name__}")
    if not path:
        raise ValueError("path must be a non-empty dotted module path, got ''")
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        old = parent.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"path {path!r}: {e}") from None
    if not isinstance(old, nn.Linear) or isinstance(old, CosineLinear):
        raise TypeError(f"path {path!r} must name an nn.Linear, got {type(old).__name__}")
    head = CosineLinear.from_linear(old, **kwargs)
    setattr(parent, name, head)
    return head


def project_after_step(optimizer: torch.optim.Optimizer, model: nn.Module):
    """After every ``optimizer.step()``, renormalize the weight rows of every
    CosineLinear in ``model`` (``model`` may be a CosineLinear itself), via
    ``optimizer.register_step_post_hook``. Returns the hook's handle
    (``handle.remove()`` stops it)."""
    heads = [m for m in model.modules() if isinstance(m, CosineLinear)]
    if not heads:
        raise ValueError(f"model ({type(model).__name__}) holds no CosineLinear")
    for head in heads:  # now rather than after the first step
        _check_parameter(head, "weight", "project_after_step", "head", _COMPUTED_WEIGHT)

    def _project(opt, args, kwargs):
        for head in heads:
            head.project_weight_()

    return optimizer.register_step_post_hook(_project)


class CosineCrossEntropyLoss(nn.Module):
    """``nnk.cosine_cross_entropy`` as a module, for models that own their
    class weights elsewhere (tied embeddings):
    ``CosineCrossEntropyLoss(**options)(x, weight, target, bias=None)`` is
    ``nnk.cosine_cross_entropy(x, weight, target, bias=bias, **options)``.

    Options are nnk.cosine_cross_entropy's keyword arguments (scale, margins,
    reduction, ...); they are checked here, at construction. x may have
    leading dims (..., D) with target (...). A tensor ``scale`` is used as
    given and not registered: its owner registers it (as the weight's does).
    """

    def __init__(self, **options):
        super().__init__()
        _check_loss_options(options)
        self.options = options

    def forward(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        """``nnk.cosine_cross_entropy(x, weight, target, bias=bias, **options)``
        with leading dims flattened.

        Args:
            x: (..., D) float16 / bfloat16 / float32 / float64 features.
            weight: (C, D) class rows, x's dtype.
            target: (...) int64 / int32 class indices in [0, C) or ignore_index.
            bias: (C,) floating tensor, or None.

        Returns:
            As nnk.cosine_cross_entropy: a 0-d float32 loss (float64 for
            float64 x), or (...) row losses for ``reduction="none"``.
        """
        return _loss_any_dims(x, weight, target, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
