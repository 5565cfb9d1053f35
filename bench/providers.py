"""The implementations timed on the cosine cross-entropy, and how each is fed.

Every provider says at run time whether it can run here (``check``: missing
package, no CUDA device, dtype) and is then built into one ``Step`` per mode
(``build``). Nothing is imported from a peer before its check passes.

Who does what work (the ``notes`` column of the CSV repeats it):
- ``nnk-*``: ``nnk.cosine_cross_entropy(x, W, y, scale=s, margins, impl=...)``,
  one per impl that ``nnk.functional.resolve_impl`` accepts on this device.
  ``nnk-cuda-gradfwd`` is ``nnk-cuda`` with ``NNK_GRAD_IN_FORWARD=1``: the
  gradients of the mean loss computed in its forward (3 GEMM passes for
  fwd+bwd instead of 4; its ``fwd`` rows include that work) where the logits
  fit one class chunk of the extension, else the same as ``nnk-cuda``.
  ``nnk-triton-gemmbwd`` is ``nnk-triton`` with ``NNK_TRITON_GEMM_BACKWARD=1``
  (the extension's cuBLAS backward after the Triton forward: which backward
  is faster at large D is for the GPU run to say).
  ``nnk-triton-fastgrad`` is ``nnk-triton`` with ``NNK_TRITON_FAST_GRAD=1``
  (16-bit inputs: the backward's d logits rounded once to the input dtype,
  as the peers' and the bound's operands are, instead of a hi + lo pair of
  tensor-core dots: about 2x the reference's error on bf16 gradients).
  ``nnk-cuda-chunk64`` is ``nnk-cuda`` with ``NNK_CHUNK_MB=64``: blocks
  sized to 64 MiB of buffers instead of 256 (less memory, smaller GEMMs:
  whether that costs time is for the GPU run to say).
  ``nnk-triton-sparse`` is ``nnk-triton`` with ``NNK_TRITON_GRAD_FILTER=1``
  (negligible d-logit tiles skip their d x and dW dots; on random benchmark
  inputs few tiles are negligible, so it measures the filter's overhead more
  than its saving).
- ``ref-eager`` / ``ref-compile``: the specification
  ``nnk.reference.cosine_cross_entropy_ref`` (float32 logits; for 16-bit
  inputs its GEMMs run in float32), eager and under ``torch.compile``.
- ``torch-eager`` / ``torch-compile``: the head as PyTorch users write it for
  16-bit inputs: normalize and the cosine GEMM in the input dtype, margin and
  cross-entropy in float32 (same as ``ref-*`` for float32 inputs: skipped).
- ``torch-lce`` (torch's own ``F.linear_cross_entropy``, chunked path),
  ``liger`` (Liger-Kernel's fused linear cross-entropy), ``cce`` (apple's
  Cut Cross-Entropy with its default gradient filter) and ``cce-exact`` (the
  same, unfiltered): fused linear + cross-entropy without normalization or
  margins. They get ``normalize(x) * s`` and ``normalize(W)`` computed outside
  the timed region, so they do less work than nnk (no normalization forward or
  backward) and, on margin cases, compute the plain scaled cross-entropy.
- ``pml``: pytorch-metric-learning's NormalizedSoftmaxLoss (plain, temperature
  1/s), CosFaceLoss or ArcFaceLoss: the same math as nnk on raw x, holding its
  own (D, C) copy of W; it materializes the logits.
- ``bound-gemm``: the three bare GEMMs of the op in the input dtype,
  ``x @ Wᵀ`` (fwd), ``g @ W`` and ``gᵀ @ x`` (bwd), g a random (N, C) tensor.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .shapes import CE_OP, Case
from .timing import Step

PRENORMALIZED = ("does less work: fed normalize(x)*s and normalize(W) computed outside the timed "
                 "region (no normalization forward/backward)")
NO_MARGIN = "; has no margins: timed as the plain scaled cross-entropy"


@dataclass(frozen=True)
class Check:
    status: str          # "ok" | "unavailable" (missing here) | "skipped" (not meaningful)
    reason: str = ""


OK = Check("ok")


@dataclass
class Run:
    steps: dict[str, Step]
    loss: Callable[[], float] | None = None   # one untimed forward's loss value


def installed(dist: str, module: str) -> str | None:
    """``"<dist> <version>"`` if ``module`` is importable, else None."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """The environment variables ``values`` set for the body of the ``with``,
    then restored: set back to their earlier values, or unset again."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def loss_run(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
             env: dict[str, str] | None = None) -> Run:
    """The three modes of a differentiable loss: forward (building the graph,
    as in training), backward alone (after an untimed forward), both. The
    setup drops the previous step's gradients and graph first, and so does
    the teardown after a sample, so that a provider's gradients never crowd
    another's steps. ``env``: environment variables set around every forward
    and backward (a variant's switches; some are read in the backward)."""
    state: dict[str, torch.Tensor] = {}
    env = env or {}

    def clear():
        state.clear()
        for p in leaves:
            p.grad = None

    def forward():
        with environment(env):
            state["loss"] = loss_fn()

    def setup_backward():
        clear()
        forward()

    def backward():
        with environment(env):
            state.pop("loss").backward()

    def both():
        with environment(env):
            loss_fn().backward()

    def value() -> float:
        # With grad enabled, as the timed steps run: under no_grad a compiled
        # provider compiled a second graph in its build (grad mode is guarded).
        with environment(env):
            return float(loss_fn().detach().float())

    return Run({"fwd": Step(forward, clear, clear),
                "bwd": Step(backward, setup_backward, clear),
                "fwdbwd": Step(both, clear, clear)}, value)


class CEInputs:
    """The tensors of one case, made on the device before anything is timed:
    x (N, D) and W (C, D) standard normal leaves in ``dtype``, y uniform labels;
    the pre-normalized pair of the peers and the (N, C) gradient of the GEMM
    bound only when a provider asks for them."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.case, self.device, self.dtype = case, device, dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(case.N, case.D, device=device, dtype=dtype, generator=gen).requires_grad_()
        self.w = torch.randn(case.C, case.D, device=device, dtype=dtype, generator=gen).requires_grad_()
        self.y = torch.randint(0, case.C, (case.N,), device=device, generator=gen)
        self._gen = gen

    @functools.cached_property
    def prenormalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs = (F.normalize(self.x.detach().float(), dim=1) * self.case.scale).to(self.dtype)
        wn = F.normalize(self.w.detach().float(), dim=1).to(self.dtype)
        return xs.requires_grad_(), wn.requires_grad_()

    @functools.cached_property
    def grad_logits(self) -> torch.Tensor:
        return torch.randn(self.case.N, self.case.C, device=self.device, dtype=self.dtype, generator=self._gen)


class Provider:
    name = ""
    kind = ""        # "nnk" | "reference" | "pytorch" | "peer" | "bound"
    op = CE_OP
    slow = False     # seconds per call: no warm-up beyond the first call, --min-rounds samples
    # Its forward computes the gradients (its backward only scales or returns
    # them): its fwd time holds all three GEMMs, and its bwd row gets no
    # TFLOP/s or bound ratio.
    grads_in_forward = False
    margin_blind = False

    def check(self, case: Case, device: torch.device, dtype: torch.dtype) -> Check:
        return OK

    def build(self, case: Case, inputs: CEInputs) -> Run:
        raise NotImplementedError

    def notes(self, case: Case) -> str:
        return ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def impl_check(impl: str, device: torch.device, dtype: torch.dtype, op: str) -> Check:
    """Whether nnk's ``impl`` can run here: ``nnk.functional.resolve_impl``
    accepts it for the device and dtype (``op``: the extension operator that
    stands for "cuda"), and Triton only on CUDA devices (the CPU interpreter
    is not worth timing)."""
    from nnk.functional import resolve_impl

    if impl == "triton" and device.type != "cuda":
        return Check("unavailable", "Triton kernels are timed on CUDA devices only (not the CPU interpreter)")
    try:
        resolve_impl(impl, device, dtype, op=op)
    except (ValueError, TypeError) as e:
        return Check("unavailable", str(e))
    return OK


# Variants of an nnk impl: (name suffix, environment set around each call, note).
NNK_VARIANTS = {
    "gradfwd": ({"NNK_GRAD_IN_FORWARD": "1"},
                "NNK_GRAD_IN_FORWARD=1: gradients of the mean loss computed in the forward (3 GEMM passes "
                "for fwd+bwd; fwd includes them) where the logits fit one class chunk, else as nnk-cuda"),
    "sparse": ({"NNK_TRITON_GRAD_FILTER": "1"},
               "NNK_TRITON_GRAD_FILTER=1: d-logit tiles below 2^-12 M / C skip their d x and dW dots"),
    "gemmbwd": ({"NNK_TRITON_GEMM_BACKWARD": "1"},
                "NNK_TRITON_GEMM_BACKWARD=1: Triton forward, the extension's chunked-GEMM backward"),
    "chunk64": ({"NNK_CHUNK_MB": "64"},
                "NNK_CHUNK_MB=64: the extension's blocks sized to 64 MiB of buffers instead of 256"),
    "fastgrad": ({"NNK_TRITON_FAST_GRAD": "1"},
                 "NNK_TRITON_FAST_GRAD=1: d logits rounded once to the input dtype (3 backward dots, as the "
                 "peers' and the bound's single-rounded operands) instead of a hi + lo pair (5)"),
}


class Nnk(Provider):
    kind = "nnk"

    def __init__(self, impl: str, variant: str | None = None):
        self.impl = impl
        self.env, self._notes = NNK_VARIANTS[variant] if variant else ({}, "")
        self.name = f"nnk-{impl}" + (f"-{variant}" if variant else "")
        self.grads_in_forward = variant == "gradfwd"

    def check(self, case, device, dtype):
        check = impl_check(self.impl, device, dtype, "cosine_cross_entropy_fwd")
        if check is OK and "NNK_TRITON_GEMM_BACKWARD" in self.env:
            from nnk.ops import has_op

            if not has_op("cosine_cross_entropy_bwd", device.type):
                return Check("unavailable", f"nnk._C has no cosine_cross_entropy_bwd for {device.type}")
        if check is OK and "NNK_TRITON_FAST_GRAD" in self.env and dtype not in (torch.float16, torch.bfloat16):
            return Check("skipped", f"{dtype_name(dtype)}: one IEEE dot per contraction either way, "
                                    "the same computation as nnk-triton")
        if check is OK and "NNK_CHUNK_MB" in self.env:
            from nnk.ops import cce_block_shape

            budget = int(self.env["NNK_CHUNK_MB"]) << 20
            shape = cce_block_shape(case.N, case.C, case.D, dtype, device.type)
            if cce_block_shape(case.N, case.C, case.D, dtype, device.type, budget) == shape:
                return Check("skipped", f"the default blocks ({shape[0]} x {shape[1]}) already fit "
                                        f"{self.env['NNK_CHUNK_MB']} MiB: the same computation as nnk-cuda")
        if check is OK and self.grads_in_forward:
            # nnk.impl.extension.grad_in_forward declines where the logits need
            # class chunks (or float16): the run would be nnk-cuda's again,
            # under a label saying the gradients came from the forward.
            from nnk.ops import cce_block_shape

            classes = cce_block_shape(case.N, case.C, case.D, dtype, device.type)[1]
            if dtype == torch.float16 or classes < case.C:
                why = ("float16" if dtype == torch.float16
                       else f"the logits need class chunks of {classes} of the {case.C} classes")
                return Check("skipped", f"{why}: NNK_GRAD_IN_FORWARD declines, the same computation as nnk-cuda")
        return check

    def build(self, case, inputs):
        import nnk

        kw = case.loss_kwargs()
        return loss_run(lambda: nnk.cosine_cross_entropy(inputs.x, inputs.w, inputs.y, impl=self.impl, **kw),
                        [inputs.x, inputs.w], self.env)

    def notes(self, case):
        return self._notes


@functools.cache
def compiled(fn):
    """``torch.compile(fn, dynamic=True)``, one per function and process: one
    compilation serves every size of a margin variant. The recompile limit is
    raised and hitting it made an error, so that a case never silently runs
    the eager fallback."""
    import torch._dynamo

    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = 64
    else:
        cfg.cache_size_limit = 64
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=True)


class Reference(Provider):
    kind = "reference"

    def __init__(self, compile_it: bool):
        self.compile_it = compile_it
        self.name = "ref-compile" if compile_it else "ref-eager"

    def build(self, case, inputs):
        from nnk.reference import cosine_cross_entropy_ref

        fn = compiled(cosine_cross_entropy_ref) if self.compile_it else cosine_cross_entropy_ref
        kw = case.loss_kwargs()
        return loss_run(lambda: fn(inputs.x, inputs.w, inputs.y, **kw), [inputs.x, inputs.w])

    def notes(self, case):
        return "torch.compile(dynamic=True)" if self.compile_it else ""


def torch_head_loss(x, w, y, *, scale: float, additive_margin: float, angular_margin: float):
    """A cosine head as commonly written in PyTorch: ``F.normalize`` and the
    cosine GEMM in the input dtype (tensor cores for 16-bit inputs), the
    margin on the target column and ``F.cross_entropy`` in float32."""
    from nnk.reference import margin_value_ref

    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).float()
    psi = margin_value_ref(cos.gather(1, y[:, None]), angular_margin, additive_margin)
    return F.cross_entropy(scale * cos.scatter(1, y[:, None], psi), y)


class TorchHead(Provider):
    kind = "pytorch"

    def __init__(self, compile_it: bool):
        self.compile_it = compile_it
        self.name = "torch-compile" if compile_it else "torch-eager"

    def check(self, case, device, dtype):
        if dtype in (torch.float32, torch.float64):
            return Check("skipped", f"the same computation as ref-{self.name.split('-')[1]} for {dtype} inputs")
        return OK

    def build(self, case, inputs):
        fn = compiled(torch_head_loss) if self.compile_it else torch_head_loss
        kw = case.loss_kwargs()
        return loss_run(lambda: fn(inputs.x, inputs.w, inputs.y, **kw), [inputs.x, inputs.w])

    def notes(self, case):
        return "16-bit GEMM, float32 CE" + ("; torch.compile(dynamic=True)" if self.compile_it else "")


class _Prenormalized(Provider):
    """A fused linear cross-entropy fed the pre-normalized, pre-scaled pair."""

    kind = "peer"
    dist = module = ""
    needs_cuda = True
    margin_blind = True   # computes the same on every margin variant of a shape

    def available(self) -> str | None:
        return installed(self.dist, self.module)

    def check(self, case, device, dtype):
        if self.available() is None:
            return Check("unavailable", f"{self.dist} is not installed (pip install 'nnk[bench]')")
        if self.needs_cuda and device.type != "cuda":
            return Check("unavailable", f"{self.dist} needs a CUDA device")
        return OK

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``f(xs, wn, y) -> loss``, imported here so the timed calls do no lookups."""
        raise NotImplementedError

    def build(self, case, inputs):
        xs, wn = inputs.prenormalized
        fn = self.loss_fn()
        return loss_run(lambda: fn(xs, wn, inputs.y), [xs, wn])

    def notes(self, case):
        return (f"{self.available()}; {PRENORMALIZED}" + (NO_MARGIN if case.variant != "plain" else "")
                + ("; gradients computed in its forward" if self.grads_in_forward else ""))


class TorchLCE(_Prenormalized):
    name, dist, module = "torch-lce", "torch", "torch"
    needs_cuda = False
    grads_in_forward = True

    def available(self):
        ok = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
        return f"torch {torch.__version__} F.linear_cross_entropy (chunked)" if ok else None

    def check(self, case, device, dtype):
        if self.available() is None:
            return Check("unavailable", f"torch {torch.__version__} has no F.linear_cross_entropy with options")
        if not (case.C > case.D and case.N >= case.D):
            # Its "auto" chunking goes down to 1-row chunks there (2 s per call at N=256, C=10, D=512 on a CPU).
            return Check("skipped", "torch documents its chunked path for C > D and N >= D (the reference "
                                    "path is cheaper otherwise)")
        return OK

    def loss_fn(self):
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda xs, wn, y: F.linear_cross_entropy(xs, wn, y, options=opts)


class Liger(_Prenormalized):
    name, dist, module = "liger", "liger-kernel", "liger_kernel"
    grads_in_forward = True

    def loss_fn(self):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        return lambda xs, wn, y: mod(wn, xs, y)   # its argument order: (weight, input, target)


class CutCrossEntropy(_Prenormalized):
    """``cce``: its defaults, which filter the backward (filter_eps="high":
    d-logit tiles whose entries are all below bf16 eps / 32, an absolute
    threshold, are skipped; with the bench's flat softmax at large C that is
    most tiles). ``cce-exact``: filter_eps=None, every tile, as nnk's exact
    kernels."""

    dist, module = "cut-cross-entropy", "cut_cross_entropy"

    def __init__(self, exact: bool):
        self.exact = exact
        self.name = "cce-exact" if exact else "cce"

    def loss_fn(self):
        from cut_cross_entropy import linear_cross_entropy

        return functools.partial(linear_cross_entropy, filter_eps=None) if self.exact else linear_cross_entropy

    def notes(self, case):
        return super().notes(case) + ("; filter_eps=None (no gradient filtering)" if self.exact else
                                      "; default gradient filtering (filter_eps='high': skips d-logit tiles "
                                      "below bf16 eps / 32)")


def pml_loss_module(case: Case):
    """The pytorch-metric-learning loss of ``case``'s variant, with its scale
    and margin (ArcFaceLoss takes degrees in the versions that convert with
    ``np.radians``; checked on the built module, not assumed)."""
    from pytorch_metric_learning import losses

    if case.variant == "cosface":
        return losses.CosFaceLoss(num_classes=case.C, embedding_size=case.D,
                                  margin=case.additive_margin, scale=case.scale)
    if case.variant == "arcface":
        m = case.angular_margin
        for given in (math.degrees(m), m):
            mod = losses.ArcFaceLoss(num_classes=case.C, embedding_size=case.D, margin=given, scale=case.scale)
            if math.isclose(float(mod.margin), m, rel_tol=1e-9):
                return mod
        raise RuntimeError(f"pytorch-metric-learning ArcFaceLoss: cannot set a margin of {m} rad")
    return losses.NormalizedSoftmaxLoss(num_classes=case.C, embedding_size=case.D, temperature=1.0 / case.scale)


class PML(Provider):
    name, kind = "pml", "peer"
    _classes = {"plain": "NormalizedSoftmaxLoss", "cosface": "CosFaceLoss", "arcface": "ArcFaceLoss"}

    def check(self, case, device, dtype):
        if installed("pytorch-metric-learning", "pytorch_metric_learning") is None:
            return Check("unavailable", "pytorch-metric-learning is not installed (pip install 'nnk[bench]')")
        return OK

    def build(self, case, inputs):
        with torch.device(inputs.device):   # its (D, C) weight: 2 GiB at the headline shapes, not made on the CPU
            mod = pml_loss_module(case)
        # Its weight layout is (D, C); start from the same W as everyone else.
        mod.W = torch.nn.Parameter(inputs.w.detach().t().contiguous())
        return loss_run(lambda: mod(inputs.x, inputs.y), [inputs.x, mod.W])

    def notes(self, case):
        dist = installed("pytorch-metric-learning", "pytorch_metric_learning")
        return f"{dist} {self._classes[case.variant]}; own (D, C) copy of W; materializes the logits"


class GemmBound(Provider):
    name, kind = "bound-gemm", "bound"

    def build(self, case, inputs):
        x, w, g = inputs.x.detach(), inputs.w.detach(), inputs.grad_logits

        def fwd():
            return torch.mm(x, w.t())

        def bwd():
            return torch.mm(g, w), torch.mm(g.t(), x)

        return Run({"fwd": Step(fwd), "bwd": Step(bwd), "fwdbwd": Step(lambda: (fwd(), bwd()))})

    def notes(self, case):
        return "bare GEMMs in the input dtype: x@W.T (fwd), g@W and g.T@x (bwd)"


def ce_providers() -> list[Provider]:
    # Built and warmed in this order, and a case's time budget skips the
    # providers left when it runs out: the bound first (without it no row gets
    # its ratio), then what the issues' targets compare (nnk's Triton and CUDA
    # paths, torch.compile of the reference and of the 16-bit head), the
    # fused peers, and last nnk's variants and the eager baselines.
    return [GemmBound(), Nnk("triton"), Nnk("cuda"), Reference(True), TorchHead(True),
            Liger(), CutCrossEntropy(True), CutCrossEntropy(False), TorchLCE(),
            Nnk("triton", "fastgrad"), Nnk("cuda", "gradfwd"), Nnk("cuda", "chunk64"), Nnk("triton", "gemmbwd"), Nnk("triton", "sparse"),
            Nnk("torch"), Reference(False), TorchHead(False), PML()]
