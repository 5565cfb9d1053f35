"""Bad input raises TypeError / ValueError naming the argument, before any
computation, for every impl reachable on this machine."""
import math

import pytest
import torch

import nnk
from nnk.reference import cosine_cross_entropy_ref


def _ok(n=4, d=3, c=5):
    return torch.randn(n, d), torch.randn(c, d), torch.randint(0, c, (n,))


CASES = [
    # (id, exception, message fragment, mutate(args, kwargs))
    ("x_not_tensor", TypeError, "x must be a torch.Tensor", lambda a, k: a.__setitem__(0, [[1.0]])),
    ("x_1d", ValueError, "x must be 2-D", lambda a, k: a.__setitem__(0, torch.randn(4))),
    ("weight_3d", ValueError, "weight must be 2-D", lambda a, k: a.__setitem__(1, torch.randn(5, 3, 1))),
    ("d_mismatch", ValueError, "weight must have D=3", lambda a, k: a.__setitem__(1, torch.randn(5, 4))),
    ("c_zero", ValueError, "at least one class", lambda a, k: a.__setitem__(1, torch.randn(0, 3))),
    ("x_int", TypeError, "x must be float16", lambda a, k: a.__setitem__(0, torch.ones(4, 3, dtype=torch.int32))),
    ("dtype_mix", TypeError, "weight dtype", lambda a, k: a.__setitem__(1, torch.randn(5, 3, dtype=torch.float64))),
    ("target_float", TypeError, "target must be int64 or int32", lambda a, k: a.__setitem__(2, torch.zeros(4))),
    ("target_shape", ValueError, "target must have shape", lambda a, k: a.__setitem__(2, torch.zeros(3, dtype=torch.long))),
    ("target_high", ValueError, "target values", lambda a, k: a.__setitem__(2, torch.tensor([0, 1, 5, 2]))),
    ("target_negative", ValueError, "target values", lambda a, k: a.__setitem__(2, torch.tensor([0, -1, 1, 2]))),
    ("device_mix", ValueError, "target is on meta", lambda a, k: a.__setitem__(2, torch.zeros(4, dtype=torch.long, device="meta"))),
    ("bias_shape", ValueError, "bias must have shape", lambda a, k: k.update(bias=torch.zeros(4))),
    ("bias_type", TypeError, "bias must be a torch.Tensor", lambda a, k: k.update(bias=[0.0] * 5)),
    ("scale_nan", ValueError, "scale must be finite", lambda a, k: k.update(scale=math.nan)),
    ("scale_inf_tensor", ValueError, "scale must be finite", lambda a, k: k.update(scale=torch.tensor(math.inf))),
    ("scale_zero", ValueError, "scale must be >", lambda a, k: k.update(scale=0.0)),
    ("scale_negative_vec", ValueError, "scale must be > 0", lambda a, k: k.update(scale=-torch.ones(5))),
    ("scale_shape", ValueError, "scale must be a float", lambda a, k: k.update(scale=torch.ones(4))),
    ("scale_str", TypeError, "scale must be a real number", lambda a, k: k.update(scale="10")),
    ("reduction", ValueError, "reduction must be one of", lambda a, k: k.update(reduction="avg")),
    ("impl", ValueError, "impl must be one of", lambda a, k: k.update(impl="cudnn")),
    ("margin_grad", ValueError, "margin_grad must be one of", lambda a, k: k.update(margin_grad="approx")),
    ("angular_negative", ValueError, "angular_margin must be >=", lambda a, k: k.update(angular_margin=-0.1)),
    ("angular_degrees", ValueError, "angular_margin must be <=", lambda a, k: k.update(angular_margin=28.6)),
    ("angular_without_norm", ValueError, "angular_margin needs normalize", lambda a, k: k.update(angular_margin=0.5, normalize_weight=False)),
    ("additive_nan", ValueError, "additive_margin must be finite", lambda a, k: k.update(additive_margin=math.nan)),
    ("smoothing_range", ValueError, "label_smoothing must be <=", lambda a, k: k.update(label_smoothing=1.5)),
    ("z_loss_negative", ValueError, "z_loss must be >=", lambda a, k: k.update(z_loss=-1.0)),
    ("eps_zero", ValueError, "eps must be >", lambda a, k: k.update(eps=0.0)),
    ("scale_tensor_zero", ValueError, "scale must be", lambda a, k: k.update(scale=torch.tensor(0.0))),
    ("scale_per_class_zero", ValueError, "scale must be", lambda a, k: k.update(scale=torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0]))),
    ("bias_int", TypeError, "bias", lambda a, k: k.update(bias=torch.arange(5))),
    # Finite in float64 but not as the float32 the kernels take (inf, or flushed to 0).
    ("scale_above_float32", ValueError, "scale=1e[+]39 is not a normal float32", lambda a, k: k.update(scale=1e39)),
    ("z_loss_above_float32", ValueError, "z_loss=1e[+]39 is not a normal float32", lambda a, k: k.update(z_loss=1e39)),
    ("eps_subnormal", ValueError, "eps=1e-39 is not a normal float32", lambda a, k: k.update(eps=1e-39)),
    ("scale_float64_tensor_above_float32", ValueError, "scale must be finite in float32",
     lambda a, k: k.update(scale=torch.tensor(1e39, dtype=torch.float64))),
    ("scale_float64_tensor_below_float32", ValueError, "scale must be > 0 in float32",
     lambda a, k: k.update(scale=torch.tensor([1.0, 1e-50, 1.0, 1.0, 1.0], dtype=torch.float64))),
    ("scale_float8", TypeError, "scale must be float16, bfloat16, float32 or float64",
     lambda a, k: k.update(scale=torch.tensor(3.0).to(torch.float8_e4m3fn))),
    ("x_nan_checked", ValueError, "x contains NaN", lambda a, k: (a[0].__setitem__((1, 1), math.nan), k.update(check_finite=True))),
    ("bias_inf_checked", ValueError, "bias contains NaN or Inf", lambda a, k: k.update(bias=torch.tensor([0, math.inf, 0, 0, 0.]), check_finite=True)),
    ("ignore_index_float", TypeError, "ignore_index must be an int", lambda a, k: k.update(ignore_index=-100.0)),
    ("ignore_index_huge", ValueError, "ignore_index must fit in int64", lambda a, k: k.update(ignore_index=2**70)),
    # Truthiness would read "no" as True: flags take bools (or 0 / 1) only.
    ("deterministic_str", TypeError, "deterministic must be a bool", lambda a, k: k.update(deterministic="no")),
    ("normalize_input_str", TypeError, "normalize_input must be a bool", lambda a, k: k.update(normalize_input="false")),
    ("normalize_weight_2", TypeError, "normalize_weight must be a bool", lambda a, k: k.update(normalize_weight=2)),
    ("return_lse_none", TypeError, "return_lse must be a bool", lambda a, k: k.update(return_lse=None)),
    ("check_finite_str", TypeError, "check_finite must be a bool", lambda a, k: k.update(check_finite="yes")),
    # The ops' dispatch errors on sparse layouts named no argument.
    ("x_sparse", TypeError, "x must be a dense", lambda a, k: a.__setitem__(0, a[0].to_sparse())),
    ("weight_sparse_csr", TypeError, "weight must be a dense", lambda a, k: a.__setitem__(1, a[1].to_sparse_csr())),
    ("target_sparse", TypeError, "target must be a dense", lambda a, k: a.__setitem__(2, a[2].to_sparse())),
    ("bias_sparse", TypeError, "bias must be a dense", lambda a, k: k.update(bias=torch.ones(5).to_sparse())),
    ("scale_sparse", TypeError, "scale must be a dense", lambda a, k: k.update(scale=torch.ones(5).to_sparse())),
]


@pytest.mark.parametrize("impl", ["auto", "torch", "cuda", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_compute(case, impl, monkeypatch):
    name, exc, msg, mutate = case
    args, kwargs = list(_ok()), {"impl": impl}
    mutate(args, kwargs)

    def boom(*a, **k):  # any backend call means validation came too late
        raise AssertionError("a backend ran before validation failed")

    import nnk._dispatch as dispatch

    monkeypatch.setattr(dispatch, "backend", lambda impl: boom)
    with pytest.raises(exc, match=msg):
        nnk.cosine_cross_entropy(*args, **kwargs)


def test_integer_arguments_take_numpy_integers():
    np = pytest.importorskip("numpy")
    x, w, t = _ok()
    want = nnk.cosine_cross_entropy(x, w, t, ignore_index=2)
    assert torch.equal(nnk.cosine_cross_entropy(x, w, t, ignore_index=np.int64(2)), want)
    head = nnk.CosineLinear(3, 5)
    assert torch.equal(head.predict(x, np.int32(2))[0], head.predict(x, 2)[0])
    with pytest.raises(TypeError, match="k must be an int"):
        head.predict(x, np.bool_(True))
    for bad, exc in ((-1, ValueError), (0, ValueError), (1.5, TypeError)):
        with pytest.raises(exc, match="block_classes must be"):
            head.predict(x, 2, block_classes=bad)


def test_head_inputs_are_checked_as_the_loss_inputs():
    x, w, _ = _ok()
    for call, msg in ((lambda: nnk.cosine_logits(x.to_sparse(), w), "x must be a dense"),
                      (lambda: nnk.cosine_topk(x, w.to_sparse(), 2), "weight must be a dense"),
                      (lambda: nnk.cosine_logits(x, w, bias=torch.ones(5).to_sparse()), "bias must be a dense")):
        with pytest.raises(TypeError, match=msg):
            call()
    # eps is judged in float32 when the weight is float32 (normalized in its
    # own dtype): beside float64 features, eps = 1e-300 was 0 there and a zero
    # class row's logits NaN, ranked first by cosine_topk.
    with pytest.raises(ValueError, match="eps=1e-300 is not a normal float32"):
        nnk.cosine_logits(x.double(), w, eps=1e-300)
    w64 = w.double()
    w64[1] = 0
    assert torch.equal(nnk.cosine_logits(x.double(), w64, eps=1e-300)[:, 1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["torch", "cuda", "triton"])
def test_inference_mode_tensors_train_on_every_impl(impl, device):
    # Features of a frozen backbone run under inference_mode: autograd refuses
    # to save them, and the Triton and CUDA Functions save their inputs (the
    # torch path, which saves normalized copies, trained; they raised).
    if impl == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    x, w, t = (v.to(device) for v in (torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g),
                                      torch.randint(0, 4, (6,), generator=g)))
    want_w = w.clone().requires_grad_()
    nnk.cosine_cross_entropy(x, want_w, t, scale=3.0, impl=impl).backward()
    with torch.inference_mode():
        xi, ti, si = x.clone(), t.clone(), torch.full((4,), 3.0, device=device)
    got_w = w.clone().requires_grad_()
    nnk.cosine_cross_entropy(xi, got_w, ti, scale=si, impl=impl).backward()
    torch.testing.assert_close(got_w.grad, want_w.grad, rtol=1e-6, atol=1e-7)


def test_meta_tensors_are_a_clear_error():
    x, w, t = (v.to("meta") for v in _ok()[:3])
    for call in (lambda: nnk.cosine_cross_entropy(x, w, t),
                 lambda: nnk.CosineLinear(3, 5, device="meta").loss(x, t)):
        with pytest.raises(ValueError, match="x is a meta tensor"):
            call()


def test_float64_with_a_32_bit_operand_under_autocast_names_the_given_dtypes():
    # Autocast casts the float32 weight and leaves float64 x alone: the
    # dtype check named a "weight dtype torch.bfloat16" the caller never had.
    head = nnk.CosineLinear(16, 10)
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (lambda: head.loss(x, y), lambda: nnk.cosine_cross_entropy(x, head.weight, y),
                     lambda: nnk.cosine_cross_entropy(x.float(), head.weight.detach().double(), y)):
            with pytest.raises(TypeError, match=r"torch\.float(64|32) and weight is torch\.float(32|64).*autocast"):
                call()


def test_float64_on_gpu_impl_is_a_type_error(device):
    # On the test device: triton on CPU tensors without the interpreter (as
    # under --device cuda) is a ValueError before the dtype is looked at.
    x, w, t = (v.to(device) for v in _ok())
    with pytest.raises(TypeError, match="float64 runs on impl='torch'"):
        nnk.cosine_cross_entropy(x.double(), w.double(), t, impl="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, t = _ok()
    with pytest.raises(ValueError, match="impl='triton' needs"):
        nnk.cosine_cross_entropy(x, w, t, impl="triton")


def test_nnk_impl_env_sets_the_default(monkeypatch):
    x, w, t = _ok()
    monkeypatch.setenv("NNK_IMPL", "bogus")
    with pytest.raises(ValueError, match="NNK_IMPL must be one of"):
        nnk.cosine_cross_entropy(x, w, t)
    monkeypatch.setenv("NNK_IMPL", "torch")
    assert torch.isfinite(nnk.cosine_cross_entropy(x, w, t))
    monkeypatch.setenv("NNK_IMPL", "")  # set but empty: "auto", as the on/off switches read it as 0
    assert torch.equal(nnk.cosine_cross_entropy(x, w, t), nnk.cosine_cross_entropy(x, w, t, impl="auto"))


def test_an_impl_from_nnk_impl_that_cannot_run_says_so(monkeypatch):
    import nnk._dispatch as dispatch

    x, w, t = _ok()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NNK_IMPL", "triton")
    with pytest.raises(ValueError, match=r"impl='triton' \(from the environment variable NNK_IMPL.*\) needs"):
        nnk.cosine_cross_entropy(x, w, t)
    monkeypatch.setenv("NNK_IMPL", "cuda")
    monkeypatch.setattr(dispatch, "has_op", lambda op, device_type: False)  # a build without the extension
    with pytest.raises(ValueError, match=r"impl='cuda' \(from the environment variable NNK_IMPL.*\) needs"):
        nnk.cosine_cross_entropy(x, w, t)
    with pytest.raises(ValueError, match=r"^impl='cuda' needs"):  # an explicit impl names itself only
        nnk.cosine_cross_entropy(x, w, t, impl="cuda")


def test_boolean_env_vars_take_0_or_1(monkeypatch):
    x, w, t = _ok()
    monkeypatch.setenv("NNK_DETERMINISTIC", "true")
    with pytest.raises(ValueError, match="NNK_DETERMINISTIC must be 0 or 1, got 'true'"):
        nnk.cosine_cross_entropy(x, w, t, impl="torch")
    assert torch.isfinite(nnk.cosine_cross_entropy(x, w, t, impl="torch", deterministic=False))
    monkeypatch.setenv("NNK_DETERMINISTIC", "1")
    a = nnk.cosine_cross_entropy(x, w, t, impl="torch")
    monkeypatch.setenv("NNK_DETERMINISTIC", "0")
    assert torch.equal(a, nnk.cosine_cross_entropy(x, w, t, impl="torch", deterministic=1))


def test_numpy_bools_are_flags():
    import numpy as np

    x, w, t = _ok()
    a = nnk.cosine_cross_entropy(x, w, t, impl="torch", normalize_input=np.True_, return_lse=np.bool_(False))
    assert torch.equal(a, nnk.cosine_cross_entropy(x, w, t, impl="torch"))


def test_module_flags_are_bools():
    with pytest.raises(TypeError, match="learn_scale must be a bool"):
        nnk.CosineLinear(3, 5, learn_scale="no")
    with pytest.raises(TypeError, match="bias must be a bool"):
        nnk.CosineLinear(3, 5, bias="False")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        nnk.CosineCrossEntropyLoss(deterministic="yes")


def test_non_finite_inputs_propagate_by_default():
    x, w, t = _ok()
    x[1, 1] = math.nan
    assert torch.isnan(nnk.cosine_cross_entropy(x, w, t, impl="torch"))
    row = nnk.cosine_cross_entropy(x, w, t, impl="torch", reduction="none")
    assert torch.isnan(row[1]) and torch.isfinite(row[[0, 2, 3]]).all()


def test_value_checks_run_inside_compiled_graphs():
    # torch.compile cannot trace the eager checks' host sync: the checks go into
    # the graph (torch._assert_async) instead of being dropped. Before, a target
    # of -1 gave a finite, wrong loss on impl="torch".
    import torch._dynamo

    torch._dynamo.reset()
    x, w, _ = _ok()
    loss = torch.compile(lambda a, b, t, s: nnk.cosine_cross_entropy(a, b, t, scale=s, impl="torch"),
                         fullgraph=True, dynamic=False)
    good_t, bad_t = torch.tensor([0, 1, 2, 3]), torch.tensor([0, -1, 2, 3])
    torch.testing.assert_close(loss(x, w, good_t, torch.tensor(3.0)),
                               nnk.cosine_cross_entropy(x, w, good_t, scale=3.0, impl="torch"))
    with pytest.raises(RuntimeError, match=r"target values must be in \[0, 5\) or ignore_index=-100"):
        loss(x, w, bad_t, torch.tensor(3.0))
    with pytest.raises(RuntimeError):  # Inductor's own index check may fire first
        loss(x, w, torch.tensor([0, 1, 2, 5]), torch.tensor(3.0))
    with pytest.raises(RuntimeError, match="scale must be > 0"):
        loss(x, w, good_t, torch.tensor(-3.0))


def test_triton_interpreter_runs_eagerly_under_torch_compile():
    # Dynamo traced into triton's interpreter and failed there with an
    # internal AttributeError (__triton_builtin__): the interpreted Function
    # is now a graph break, and fullgraph=True says so.
    import torch._dynamo

    torch._dynamo.reset()
    x, w, t = _ok()
    fn = lambda a, b, t: nnk.cosine_cross_entropy(a, b, t, scale=4.0, impl="triton")  # noqa: E731
    xg = x.clone().requires_grad_(True)
    got = torch.compile(fn, backend="eager")(xg, w, t)
    got.backward()
    xe = x.clone().requires_grad_(True)
    want = fn(xe, w, t)
    want.backward()
    assert torch.equal(got, want) and torch.equal(xg.grad, xe.grad)
    with pytest.raises(Exception, match="disable"):
        torch.compile(fn, backend="eager", fullgraph=True)(x, w, t)


def test_auto_takes_the_torch_path_on_gpus_older_than_sm80(monkeypatch):
    # nnk's GPU kernels target sm_80+ (bf16 dots; the extension's SASS/PTX):
    # "auto" must not send a Turing GPU to them. No GPU needed: the capability
    # cache is filled by hand.
    import nnk._dispatch as dispatch

    cuda0 = torch.device("cuda", 0)
    monkeypatch.delenv("NNK_IMPL", raising=False)
    monkeypatch.setattr(dispatch, "_CAPABILITY", {0: (7, 5)})
    assert dispatch.resolve_impl("auto", cuda0, torch.float16) == "torch"

    @torch.compile(fullgraph=True, backend="eager")
    def picked(x):  # the choice while torch.compile traces, as a number
        return x + len(dispatch.resolve_impl("auto", cuda0, torch.float16))

    assert int(picked(torch.zeros(()))) == len("torch")
    monkeypatch.setattr(dispatch, "_CAPABILITY", {0: (9, 0)})
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: True)
    assert dispatch.resolve_impl("auto", cuda0, torch.bfloat16) == "triton"
    # While torch.compile traces: the extension's ops (opaque nodes with fake
    # kernels), not the Triton launchers; triton when the extension is absent,
    # and for float16 (see the fp16-accumulation test below).
    @torch.compile(fullgraph=True, backend="eager")
    def picked_bf16(x):
        return x + len(dispatch.resolve_impl("auto", cuda0, torch.bfloat16))

    monkeypatch.setattr(dispatch, "has_op", lambda op, device_type: True)
    torch._dynamo.reset()
    assert int(picked_bf16(torch.zeros(()))) == len("cuda")
    assert int(picked(torch.zeros(()))) == len("triton")
    monkeypatch.setattr(dispatch, "has_op", lambda op, device_type: False)
    torch._dynamo.reset()
    assert int(picked_bf16(torch.zeros(()))) == len("triton")


def test_cuda_impl_refuses_float16_under_fp16_accumulation(monkeypatch):
    # allow_fp16_accumulation makes ATen ask cuBLAS for float16 compute on
    # every float16 GEMM, which cuBLAS lacks for the extension's float32
    # outputs: a clear error before any launch (explicit "cuda"), the torch
    # path instead ("auto" without triton). No GPU needed to resolve.
    import nnk._dispatch as dispatch

    cuda0 = torch.device("cuda", 0)
    monkeypatch.delenv("NNK_IMPL", raising=False)
    monkeypatch.setattr(dispatch, "_CAPABILITY", {0: (9, 0)})
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: False)
    monkeypatch.setattr(dispatch, "has_op", lambda op, device_type: True)  # a CUDA build or not
    matmul = torch.backends.cuda.matmul  # a global flag, not monkeypatch-able
    matmul.allow_fp16_accumulation = True
    try:
        with pytest.raises(ValueError, match="allow_fp16_accumulation"):
            dispatch.resolve_impl("cuda", cuda0, torch.float16)
        assert dispatch.resolve_impl("auto", cuda0, torch.float16) == "torch"
        assert dispatch.resolve_impl("cuda", cuda0, torch.bfloat16) == "cuda"
        assert dispatch.resolve_impl("cuda", cuda0, torch.float16, op="nc_class_sums", arg="features") == "cuda"
        monkeypatch.setattr(dispatch, "_triton_usable", lambda device: True)

        @torch.compile(fullgraph=True, backend="eager")
        def picked(x):  # while tracing, "auto" prefers the extension, but not for float16 (flag unread)
            return x + len(dispatch.resolve_impl("auto", cuda0, torch.float16))

        torch._dynamo.reset()
        assert int(picked(torch.zeros(()))) == len("triton")
    finally:
        matmul.allow_fp16_accumulation = False
    torch._dynamo.reset()
    assert int(picked(torch.zeros(()))) == len("triton")  # flag off: the same while tracing
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: False)
    assert dispatch.resolve_impl("auto", cuda0, torch.float16) == "cuda"
    torch._dynamo.reset()  # without triton, tracing float16 (flag unread) takes the torch path
    assert int(picked(torch.zeros(()))) == len("torch")


def test_nnk_impl_leaves_float64_on_the_torch_path(monkeypatch):
    # NNK_IMPL is the process default of impl="auto"; only the torch path takes
    # float64, so a float64 call (gradcheck) must not fail because of it.
    x, w, t = (v.double() if v.is_floating_point() else v for v in _ok())
    monkeypatch.setenv("NNK_IMPL", "cuda")
    want = nnk.cosine_cross_entropy(x, w, t, impl="torch")
    assert torch.equal(nnk.cosine_cross_entropy(x, w, t), want)
    if nnk.ops.has_op("cosine_cross_entropy_fwd", "cpu"):  # else impl="cuda" says the extension is missing
        with pytest.raises(TypeError, match="float64 runs on impl='torch'"):  # an explicit impl still says so
            nnk.cosine_cross_entropy(x, w, t, impl="cuda")


def test_loss_module_checks_its_flags_at_construction():
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        nnk.CosineCrossEntropyLoss(return_lse="no")
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        nnk.CosineCrossEntropyLoss(check_finite=None)


def test_float64_inputs_take_float64_options():
    # The float32 range check is for the kernels; float64 runs in float64.
    x, w, t = (v.double() if v.is_floating_point() else v for v in _ok())
    for kw in (dict(eps=1e-300), dict(scale=1e39), dict(angular_margin=1e-40)):
        got = nnk.cosine_cross_entropy(x, w, t, impl="torch", **kw)
        assert torch.isfinite(got) and torch.allclose(got, cosine_cross_entropy_ref(x, w, t, **kw), rtol=1e-12)
    head = nnk.CosineLinear(3, 5, scale=1e39, eps=1e-300, dtype=torch.float64)
    assert torch.isfinite(head.loss(x, t, impl="torch"))
    with pytest.raises(ValueError, match="not a normal float32"):
        nnk.CosineLinear(3, 5, eps=1e-300)


def test_float32_options_below_the_normal_range_are_zero():
    # Margins, smoothing and z-loss below float32's smallest normal number
    # cannot change a float32 loss; property tests draw them (5e-324,
    # 8e-103): they count as 0 instead of raising. eps and scale, which
    # divide and multiply, still must be normal float32 numbers.
    x, w, t = _ok()
    tiny = dict(additive_margin=-1e-100, angular_margin=1e-40, label_smoothing=5e-324, z_loss=1e-45)
    want = nnk.cosine_cross_entropy(x, w, t)
    assert torch.equal(nnk.cosine_cross_entropy(x, w, t, **tiny), want)
    heads = []
    for margin in (1e-300, 0.0):
        torch.manual_seed(0)
        heads.append(nnk.CosineLinear(3, 5, additive_margin=margin))
    assert torch.equal(heads[0].loss(x, t, z_loss=1e-300), heads[1].loss(x, t))
    with pytest.raises(ValueError, match="eps=1e-39 is not a normal float32"):
        nnk.cosine_cross_entropy(x, w, t, eps=1e-39)


def test_reference_all_ignored_mean_with_z_loss_has_zero_gradients():
    # As F.cross_entropy (and the kernels): NaN loss, zero gradients; the
    # reference's z-loss term made them NaN (inf * 0).
    x = torch.randn(3, 4, requires_grad=True)
    loss = cosine_cross_entropy_ref(x, torch.randn(5, 4), torch.full((3,), -100), z_loss=0.1)
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(x))


def test_float64_is_left_alone_under_autocast():
    # Autocast casts floating operands as nn.Linear's matmul, float64 excepted.
    x, w, t = (v.double() if v.is_floating_point() else v for v in _ok())
    want = nnk.cosine_cross_entropy(x, w, t, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nnk.cosine_cross_entropy(x, w, t, impl="torch")
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_module_owned_options_are_not_per_call():
    head = nnk.CosineLinear(3, 5)
    x, t = _ok()[0], _ok()[2]
    for name, value in (("eps", 1e-3), ("bias", None), ("normalize_input", False)):
        with pytest.raises(TypeError, match=f"{name} is set by the module"):
            head.loss(x, t, **{name: value})
