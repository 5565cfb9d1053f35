"""Options of the cosine cross-entropy and the checks every entry point runs
before any computation: one place, so that every impl rejects the same inputs
with the same messages."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

from .reference import acc_dtype

IMPLS = ("auto", "cuda", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "detached")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Beyond pi every target takes ArcFace's fallback; an angular margin that large
# is almost surely degrees passed as radians (ArcFace's 0.5 rad is 28.6 degrees).
MAX_ANGULAR_MARGIN = math.pi


@dataclass(frozen=True)
class CCEOptions:
    """The non-tensor options of one cosine cross-entropy call, checked."""

    normalize_input: bool = True
    normalize_weight: bool = True
    additive_margin: float = 0.0
    angular_margin: float = 0.0
    margin_grad: str = "exact"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    eps: float = 1e-12
    deterministic: bool = False

    @property
    def exact_margin(self) -> bool:
        return self.margin_grad == "exact"


def _is_real(v) -> bool:
    # torch.SymFloat: a float option that torch.compile made symbolic after it
    # changed between calls (a margin or scale schedule).
    return (isinstance(v, numbers.Real) and not isinstance(v, bool)) or isinstance(v, torch.SymFloat)


_F32_MAX = 3.4028234663852886e38    # torch.finfo(torch.float32).max
_F32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, the smallest normal


def int_option(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument: an int or numpy integer (not a bool), within int64
    (the kernels take int64) and [lo, hi] when given."""
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or str(getattr(v, "dtype", "")) == "bool":
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if not -2**63 <= v < 2**63:
        raise ValueError(f"{name} must fit in int64, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (
            f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def float32_options(dtype) -> bool:
    """Whether float options must be float32 values for inputs of ``dtype``
    (anything but float64, which is computed in float64)."""
    return (dtype if dtype is not None else torch.get_default_dtype()) != torch.float64


def _finite_float(name: str, v, *, lo=None, hi=None, lo_open=False, float32=True, flush_tiny=False) -> float:
    if not _is_real(v):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    # Comparisons rather than math.isfinite, which torch.compile cannot trace on a SymFloat.
    if not -math.inf < v < math.inf:
        raise ValueError(f"{name} must be finite, got {v}")
    # flush_tiny (margins, smoothing, z-loss: terms added to float32 values):
    # a magnitude below float32's normal range cannot change a float32 result
    # (and GPUs flush it to 0): it is 0, as in PyTorch's float32 arithmetic.
    if float32 and flush_tiny and -_F32_TINY < v < _F32_TINY:
        v = 0.0
    # The kernels take options as float32: 1e39 would become inf (a NaN loss),
    # and a subnormal one is flushed to 0 on GPUs (eps = 1e-39 would then divide by 0).
    # (float32=False: float64 inputs, computed in float64 throughout.)
    if float32 and (not -_F32_MAX <= v <= _F32_MAX or (v != 0.0 and -_F32_TINY < v < _F32_TINY)):
        raise ValueError(f"{name}={v} is not a normal float32 (the kernels compute in float32): "
                         f"its magnitude must be 0 or within [{_F32_TINY:.4g}, {_F32_MAX:.4g}]")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi:.6g}, got {v}")
    return v


def _choice(name: str, v, choices) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def flag(name: str, v) -> bool:
    """A boolean option: True, False (or a numpy bool), 1 or 0. Anything else
    (``"no"``, None, 2) is a TypeError rather than Python's truthiness, which reads the
    string ``"no"`` as True."""
    numpy_bool = str(getattr(v, "dtype", "")) == "bool" and getattr(v, "shape", None) == ()
    if isinstance(v, bool) or numpy_bool or (isinstance(v, numbers.Integral) and v in (0, 1)):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {v!r}")


def env_flag(name: str) -> bool:
    """The process default a boolean environment variable sets: unset, empty
    or "0" is False, "1" True; any other value is a ValueError (a typo such as
    "true" must not silently keep the other mode)."""
    v = os.environ.get(name, "")
    if v not in ("", "0", "1"):
        raise ValueError(f"environment variable {name} must be 0 or 1, got {v!r}")
    return v == "1"


# The largest NNK_CHUNK_MB (1 TiB): its bytes stay far inside int64.
MAX_CHUNK_MB = 1 << 20


def env_chunk_bytes() -> int:
    """The extension's block budget in bytes that ``NNK_CHUNK_MB`` sets (an
    integer of MiB in [1, MAX_CHUNK_MB]); 0, the extension's default (256 MiB),
    when it is unset or empty. Any other value is a ValueError."""
    v = os.environ.get("NNK_CHUNK_MB", "")
    if v == "":
        return 0
    mib = int(v) if v.isdigit() else 0
    if not 1 <= mib <= MAX_CHUNK_MB:
        raise ValueError(f"environment variable NNK_CHUNK_MB must be an integer number of MiB in "
                         f"[1, {MAX_CHUNK_MB}], got {v!r}")
    return mib << 20


def deterministic_flag(deterministic) -> bool:
    """``deterministic``, where None means the process default ``NNK_DETERMINISTIC``."""
    return env_flag("NNK_DETERMINISTIC") if deterministic is None else flag("deterministic", deterministic)


def make_options(
    *,
    normalize_input,
    normalize_weight,
    additive_margin,
    angular_margin,
    margin_grad,
    ignore_index,
    label_smoothing,
    z_loss,
    eps,
    deterministic=False,
    float32=True,
) -> CCEOptions:
    """The checked options; ``float32=False`` (float64 inputs) lets float
    options outside float32's normal range through."""
    ignore_index = int_option("ignore_index", ignore_index)
    opts = CCEOptions(
        normalize_input=flag("normalize_input", normalize_input),
        normalize_weight=flag("normalize_weight", normalize_weight),
        additive_margin=_finite_float("additive_margin", additive_margin, float32=float32, flush_tiny=True),
        angular_margin=_finite_float("angular_margin", angular_margin, lo=0.0, hi=MAX_ANGULAR_MARGIN,
                                     float32=float32, flush_tiny=True),
        margin_grad=_choice("margin_grad", margin_grad, MARGIN_GRADS),
        ignore_index=ignore_index,
        label_smoothing=_finite_float("label_smoothing", label_smoothing, lo=0.0, hi=1.0, float32=float32,
                                      flush_tiny=True),
        z_loss=_finite_float("z_loss", z_loss, lo=0.0, float32=float32, flush_tiny=True),
        eps=_finite_float("eps", eps, lo=0.0, lo_open=True, float32=float32),
        deterministic=flag("deterministic", deterministic),
    )
    if opts.angular_margin != 0.0 and not (opts.normalize_input and opts.normalize_weight):
        raise ValueError(
            "angular_margin needs normalize_input=True and normalize_weight=True: "
            "an angle is only defined between unit vectors"
        )
    return opts


def _value_check(ok: torch.Tensor, exc: type[Exception], msg: str, detail=None) -> None:
    """Raise ``exc(detail() or msg)`` unless the 0-d bool tensor ``ok`` is true.
    Eagerly this syncs with the device; torch.compile cannot trace that sync,
    so while it traces the check goes into the graph instead
    (torch._assert_async: a RuntimeError with ``msg`` on CPU, a device-side
    assert on CUDA; an index check that Inductor compiled into a kernel may
    fire first with its own message), never a silently wrong loss."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise exc(detail() if detail is not None else msg)


def invalid_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Bool mask of the targets outside [0, num_classes) that are not
    ``ignore_index`` (which may itself lie anywhere, e.g. a pad label = C)."""
    return (target != ignore_index) & ((target < 0) | (target >= num_classes))


def check_dense(name: str, t) -> None:
    """A TypeError for a sparse (or other non-strided) tensor: the kernels
    index dense memory, and the ops' dispatch errors did not name the argument."""
    if isinstance(t, torch.Tensor) and t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_operands(x, weight, dtypes=FLOAT_DTYPES, op: str = "") -> tuple[int, int, int]:
    """x (N, D) and weight (C, D): dense tensors of one dtype among ``dtypes``, C >= 1;
    returns ``(N, D, C)``. A TypeError for a type, layout or dtype, else a
    ValueError, its message led by ``op`` when given."""
    at = f"{op}: " if op else ""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{at}{name} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(f"{at}{name}", t)
    if x.dim() != 2:
        raise ValueError(f"{at}x must be 2-D (N, D), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{at}weight must be 2-D (C, D), got shape {tuple(weight.shape)}")
    n, d = x.shape
    c = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"{at}weight must have D={d} columns like x {tuple(x.shape)}, "
                         f"got shape {tuple(weight.shape)}")
    if c == 0:
        raise ValueError(f"{at}weight must have at least one class (C >= 1), got C=0")
    if x.dtype not in dtypes:
        names = [str(t).removeprefix("torch.") for t in dtypes]
        raise TypeError(f"{at}x must be {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{at}weight dtype {weight.dtype} must match x dtype {x.dtype}")
    return n, d, c


def check_target_dtype(target: torch.Tensor) -> None:
    """Class indices: int64 or int32 (a TypeError otherwise, which names soft
    targets, as mixup or distillation pass to F.cross_entropy, for a floating
    one)."""
    if target.dtype in (torch.int64, torch.int32):
        return
    soft = (" (class indices: soft, probability targets as F.cross_entropy takes them are not supported)"
            if target.is_floating_point() else "")
    raise TypeError(f"target must be int64 or int32, got {target.dtype}{soft}")


def check_tensors(x, weight, target, scale, bias, opts: CCEOptions, *, check_finite: bool = False):
    """Check shapes, dtypes, devices and values; return ``(target, scale)`` with
    target as int64 and scale as a Python float or a tensor of shape () or
    (C,) (keeping its autograd history): float32, or float64 if it was given
    as float64, whatever x's dtype (each backend casts it as it computes).
    ``check_finite`` also rejects NaN/Inf in x, weight and bias (otherwise
    they propagate, as in PyTorch)."""
    n, d, c = check_operands(x, weight)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    for name, t in (("target", target), ("scale", scale), ("bias", bias)):
        check_dense(name, t)
    if d == 0:
        raise ValueError("x and weight must have D >= 1 features, got D=0")
    check_target_dtype(target)
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},) like x's rows, got {tuple(target.shape)}")
    dev = x.device
    if dev.type == "meta":
        # The value checks (target range, scale) read data a meta tensor does not have.
        raise ValueError("x is a meta tensor: nnk's ops need data (for shape inference, "
                         "trace them with torch.compile, whose fake kernels are registered)")
    if weight.device != dev:
        raise ValueError(f"weight is on {weight.device} but x is on {dev}")
    if target.device != dev:
        raise ValueError(f"target is on {target.device} but x is on {dev}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (c,):
            raise ValueError(f"bias must have shape ({c},), got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.device != dev:
            raise ValueError(f"bias is on {bias.device} but x is on {dev}")
    scale = _check_scale(scale, c, dev, float32=x.dtype != torch.float64)
    if check_finite:
        for name, t in (("x", x), ("weight", weight), ("bias", bias)):
            if t is not None:
                _value_check(torch.isfinite(t).all(), ValueError, f"{name} contains NaN or Inf (check_finite=True)")
    # The kernels index it as a dense (N,) vector (a strided int64 view would
    # otherwise be read as if contiguous).
    target = target.long().contiguous()
    if n > 0:
        bad = invalid_targets(target, c, opts.ignore_index)
        msg = f"target values must be in [0, {c}) or ignore_index={opts.ignore_index}"
        _value_check(~bad.any(), ValueError, msg, lambda: f"{msg}, got {int(target[bad][0])}")
    return target, scale


def _check_scale(scale, c: int, dev: torch.device, *, float32: bool = True):
    if isinstance(scale, torch.Tensor):
        if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != c):
            raise ValueError(f"scale must be a float, a 0-d tensor or a ({c},) tensor, got shape {tuple(scale.shape)}")
        if scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"scale must be float16, bfloat16, float32 or float64, got {scale.dtype}")
        if scale.device != dev:
            raise ValueError(f"scale is on {scale.device} but x is on {dev}")
        if scale.numel() > 0:
            # Judged in float32 when the kernels compute in it: a float64 1e39
            # is finite but becomes inf there (and 1e-50 becomes 0).
            used = scale.detach().to(torch.float32) if float32 else scale.detach()
            # One check (one device sync); which condition failed is worked out only then.
            _value_check((torch.isfinite(used) & (used > 0)).all(), ValueError, "scale must be > 0 and finite",
                         lambda: (f"scale must be finite{' in float32' if float32 else ''}, got a non-finite value"
                                  if not bool(torch.isfinite(used).all())
                                  else f"scale must be > 0{' in float32' if float32 else ''}, got a non-positive value"))
        return scale.to(acc_dtype(scale.dtype))
    return _finite_float("scale", scale, lo=0.0, lo_open=True, float32=float32)
