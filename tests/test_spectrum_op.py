"""Batched singular values / spectrum statistics: csrc extension and torch path vs float64 references."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptpeft_fast import _ext
from ptpeft_fast.ops import spectrum as op
from ptpeft_fast.ops import use_backend

BACKENDS = ["csrc", "torch"]


@pytest.fixture(scope="session", autouse=True)
def spectrum_ext() -> bool:
    """Build the extension once per session (cached on disk across sessions)."""
    if os.environ.get("PTPEFT_FAST_NO_EXT") == "1":
        return False
    ok = _ext.load_ext()
    assert ok, f"the csrc extension must build here (design §4): {_ext.ext_error()}"
    return ok


@pytest.fixture(params=BACKENDS)
def backend(request, spectrum_ext) -> str:
    if request.param == "csrc" and not spectrum_ext:
        pytest.skip("extension disabled by PTPEFT_FAST_NO_EXT=1")
    return request.param


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def ref_singular_values(x: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Per-sample float64 svdvals of the valid rows, zero-padded to min(L, d)."""
    B, L, d = x.shape
    lengths = lengths or [L] * B
    out = torch.zeros(B, min(L, d), dtype=torch.float64)
    for b in range(B):
        s = torch.linalg.svdvals(x[b, : lengths[b]].double())
        out[b, : s.numel()] = s
    return out


def ref_stats(x: torch.Tensor, lengths: list[int] | None = None, tau: float = 0.9):
    """The formulas of design §1 in plain Python floats (float64)."""
    s = ref_singular_values(x, lengths).tolist()
    d = x.shape[2]
    lengths = lengths or [x.shape[1]] * x.shape[0]
    ks = [min(n, d) for n in lengths]
    K = max(ks)
    mean = [0.0] * K
    eranks = []
    for row, k in zip(s, ks, strict=True):
        total = sum(row[:k])
        p = [v / total for v in row[:k]]
        for i, v in enumerate(p):
            mean[i] += v / len(s)
        eranks.append(math.exp(-sum(v * math.log(v) for v in p if v > 0)))
    curve, acc = [], 0.0
    for v in mean:
        acc += v
        curve.append(acc)
    kstar = next((i + 1 for i, c in enumerate(curve) if c >= tau), K)
    return mean, curve, kstar / K, sum(eranks) / len(eranks)


def with_spectrum(B: int, L: int, d: int, svals: list[float], gen: torch.Generator) -> torch.Tensor:
    """Features U diag(s) V^T with prescribed singular values (float64)."""
    out = torch.empty(B, L, d, dtype=torch.float64)
    k = len(svals)
    for b in range(B):
        u, _ = torch.linalg.qr(torch.randn(L, k, dtype=torch.float64, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64, generator=gen))
        out[b] = u @ torch.diag(torch.tensor(svals, dtype=torch.float64)) @ v.T
    return out


# ---------------------------------------------------------------- singular values


@pytest.mark.parametrize("shape", [(3, 7, 20), (3, 20, 7), (2, 1, 16), (2, 16, 1), (2, 9, 9), (4, 65, 130),
                                   (2, 130, 70)])
def test_singular_values_float64(backend, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, dtype=torch.float64, generator=gen) * 3 + 0.5
    s = op.singular_values(x, backend=backend)
    assert s.shape == (shape[0], min(shape[1], shape[2])) and s.dtype == torch.float64
    assert rel_err(s, ref_singular_values(x)) <= 1e-12
    assert (s[:, :-1] >= s[:, 1:]).all(), "descending"


@pytest.mark.parametrize("shape", [(5, 48, 96), (3, 96, 40)])
def test_singular_values_float32_well_conditioned(backend, shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    s = op.singular_values(x, backend=backend)
    assert s.dtype == torch.float32
    assert rel_err(s, ref_singular_values(x)) <= 1e-5


def test_rank_deficient(backend):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 40, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(3, 5, 60, dtype=torch.float64, generator=gen)
    x = a @ b  # rank 5 of min(40, 60) = 40
    s = op.singular_values(x, backend=backend)
    ref = ref_singular_values(x)
    smax = ref[:, :1]
    assert rel_err(s, ref) <= 1e-7
    big = ref > 1e-6 * smax  # the accuracy contract: values above 1e-6·s_max
    assert ((s - ref).abs()[big] <= 1e-9 * smax.expand_as(ref)[big]).all()
    # The zero singular values come out at round-off level of the Gram matrix (≈ sqrt(eps)·s_max).
    assert (s[:, 5:] <= 1e-6 * smax).all()


def test_rank_deficient_float32_curve_within_1e4(backend):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 64, 6, generator=gen) @ torch.randn(4, 6, 96, generator=gen)).float()
    raw = op.spectrum_stats(x, backend=backend)
    _, curve, _, _ = ref_stats(x.double())
    # A float32 Gram alone is ~1e-3 off here (58 zero singular values come out near
    # sqrt(eps)·s_max); the csrc kernel detects that and redoes such samples in float64.
    assert (raw.curve - torch.tensor(curve, dtype=torch.float64)).abs().max() <= 1e-4
    s = op.singular_values(x, backend=backend).double()
    ref = ref_singular_values(x.double())
    smax = ref[:, :1].expand_as(ref)
    big = ref > 1e-6 * smax
    assert ((s - ref).abs()[big] <= 1e-5 * smax[big]).all()


@pytest.mark.parametrize("L,d", [(3, 3), (8, 16), (16, 8), (40, 5), (5, 40), (33, 65), (96, 64), (130, 200)])
@pytest.mark.parametrize("family", ["rank1", "rank_half", "rank_all_but_one", "near_deficient", "decaying", "outlier"])
def test_float32_singular_values_within_1e5_on_every_shape(backend, L, d, family):
    """The fp32 tolerance of design §5 (‖s − s_ref‖/‖s_ref‖ ≤ 1e-5 against float64 svdvals of the
    same fp32 input) on small, rank-deficient, nearly deficient and tall/wide batches: a float32
    Gram alone misses it by up to 2e-4 on such samples (zeros come out near √eps·s_max)."""
    gen = torch.Generator().manual_seed(L * 1000 + d + len(family))
    n = min(L, d)
    B = 3
    if family.startswith("rank"):
        r = {"rank1": 1, "rank_half": max(1, n // 2), "rank_all_but_one": max(1, n - 1)}[family]
        x = (torch.randn(B, L, r, dtype=torch.float64, generator=gen)
             @ torch.randn(B, r, d, dtype=torch.float64, generator=gen))
    elif family == "near_deficient":  # smallest values a few times the float32 Gram's noise level
        x = with_spectrum(B, L, d, torch.logspace(0, -3.5, n).tolist(), gen)
    elif family == "decaying":
        x = torch.randn(B, L, d, dtype=torch.float64, generator=gen) * torch.logspace(0, -2, d, dtype=torch.float64)
    else:  # two outlier dimensions, as in transformer features
        x = torch.randn(B, L, d, dtype=torch.float64, generator=gen)
        x[..., :2] *= 300.0
    x = x.float()
    s = op.singular_values(x, backend=backend)
    assert s.dtype == torch.float32
    assert rel_err(s, ref_singular_values(x)) <= 1e-5


def test_duplicated_singular_values(backend):
    gen = torch.Generator().manual_seed(4)
    svals = [5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 1e-3, 1e-3]
    x = with_spectrum(3, 12, 10, svals, gen)
    s = op.singular_values(x, backend=backend)
    ref = torch.tensor(svals + [0.0] * 2, dtype=torch.float64).expand(3, -1)
    assert ((s[:, :8] - ref[:, :8]).abs() <= 1e-9 * 5.0).all()
    assert (s[:, 8:] <= 1e-6 * 5.0).all()  # true zeros: Gram round-off level, below the 1e-6·s_max contract


def test_variable_lengths(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 30, 12, dtype=torch.float64, generator=gen)
    lengths = [30, 1, 12, 7, 13]
    s = op.singular_values(x, torch.tensor(lengths), backend=backend)
    assert rel_err(s, ref_singular_values(x, lengths)) <= 1e-12
    for b, n in enumerate(lengths):
        assert (s[b, min(n, 12):] == 0).all(), "exact zeros beyond min(length, d)"
    # Rows beyond the length are ignored, whatever they hold.
    y = x.clone()
    y[1, 1:] = 1e3
    assert torch.equal(op.singular_values(y, torch.tensor(lengths), backend=backend)[1], s[1])


def test_half_precision_inputs_run_in_float32(backend):
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(6))
    for dt in (torch.float16, torch.bfloat16):
        s = op.singular_values(x.to(dt), backend=backend)
        assert s.dtype == torch.float32
        assert rel_err(s, ref_singular_values(x.to(dt).float())) <= 1e-5


def test_non_contiguous_and_grad_inputs(backend):
    base = torch.randn(2, 16, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    x = base.transpose(1, 2)  # [2, 9, 16], non-contiguous
    s = op.singular_values(x, backend=backend)
    assert not s.requires_grad  # analysis op: not differentiable
    assert rel_err(s, ref_singular_values(x.detach())) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), L=st.integers(1, 40), d=st.integers(1, 40), seed=st.integers(0, 2**16),
    use_lengths=st.booleans(),
)
def test_property_matches_svdvals(spectrum_ext, B, L, d, seed, use_lengths):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, d, dtype=torch.float64, generator=gen)
    lengths = torch.randint(1, L + 1, (B,), generator=gen).tolist() if use_lengths else None
    ref = ref_singular_values(x, lengths)
    for backend in BACKENDS if spectrum_ext else ["torch"]:
        s = op.singular_values(x, None if lengths is None else torch.tensor(lengths), backend=backend)
        assert rel_err(s, ref) <= 1e-11


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("tau", [0.5, 0.9, 1.0])
def test_stats_match_python_reference(backend, tau):
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 20, 14, dtype=torch.float64, generator=gen)
         @ torch.diag(torch.linspace(0.1, 3, 14, dtype=torch.float64)))
    lengths = [20, 3, 14, 9, 1, 17]
    raw = op.spectrum_stats(x, torch.tensor(lengths), tau, backend=backend)
    mean, curve, ratio, erank = ref_stats(x, lengths, tau)
    assert raw.mean_spectrum.dtype == torch.float64 and raw.mean_spectrum.shape == (14,)
    assert (raw.mean_spectrum - torch.tensor(mean, dtype=torch.float64)).abs().max() <= 1e-12
    assert (raw.curve - torch.tensor(curve, dtype=torch.float64)).abs().max() <= 1e-12
    assert float(raw.remaining_rank_ratio) == pytest.approx(ratio, abs=0)
    assert float(raw.effective_rank) == pytest.approx(erank, rel=1e-12)


def test_stats_K_is_longest_valid_rank(backend):
    x = torch.randn(3, 10, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    raw = op.spectrum_stats(x, torch.tensor([2, 6, 4]), backend=backend)
    assert raw.curve.shape == (6,)
    assert float(raw.curve[-1]) == pytest.approx(1.0, abs=1e-12)


def test_stats_rank_one_and_identity(backend):
    x = torch.zeros(2, 4, 4, dtype=torch.float64)
    x[0] = torch.eye(4)  # flat spectrum: effective rank 4, ratio ceil(0.9·4)/4
    x[1, 0, 0] = 2.0  # rank one: effective rank 1
    raw = op.spectrum_stats(x[:1], backend=backend)
    assert float(raw.effective_rank) == pytest.approx(4.0, rel=1e-12)
    assert float(raw.remaining_rank_ratio) == 1.0
    raw = op.spectrum_stats(x[1:], backend=backend)
    assert float(raw.effective_rank) == pytest.approx(1.0, rel=1e-12)
    assert float(raw.remaining_rank_ratio) == 0.25


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_is_value_error(backend, bad):
    for dt in (torch.float32, torch.float64):
        x = torch.randn(3, 5, 8, dtype=dt)
        x[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf.*1"):
            op.singular_values(x, backend=backend)
        with pytest.raises(ValueError, match="NaN or Inf"):
            op.spectrum_stats(x.transpose(1, 2), backend=backend)


def test_nan_beyond_length_is_ignored(backend):
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    x[0, 5] = float("nan")
    s = op.singular_values(x, torch.tensor([5, 6]), backend=backend)
    assert torch.isfinite(s).all()


@pytest.mark.parametrize(
    "x, lengths, match",
    [
        (torch.randn(0, 4, 4), None, "empty batch"),
        (torch.randn(4, 4), None, "3-D"),
        (torch.randn(2, 3, 4, 4), None, "3-D"),
        (torch.randn(2, 0, 4), None, "empty token or feature"),
        (torch.randint(0, 3, (2, 3, 4)), None, "floating-point"),
        (torch.randn(2, 3, 4), torch.tensor([1, 0]), r"lengths must lie in \[1, 3\]"),
        (torch.randn(2, 3, 4), torch.tensor([1, 4]), r"lengths must lie in \[1, 3\]"),
        (torch.randn(2, 3, 4), torch.tensor([1]), "one entry per sample"),
        (torch.randn(2, 3, 4), torch.tensor([1.0, 2.0]), "integer"),
    ],
)
def test_bad_inputs_are_value_errors(backend, x, lengths, match):
    with pytest.raises(ValueError, match=match):
        op.singular_values(x, lengths, backend=backend)
    with pytest.raises(ValueError, match=match):
        op.spectrum_stats(x, lengths, backend=backend)


def test_all_zero_sample_in_stats_is_value_error(backend):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x[2] = 0
    assert (op.singular_values(x, backend=backend)[2] == 0).all()
    with pytest.raises(ValueError, match="sample 2 has all-zero features"):
        op.spectrum_stats(x, backend=backend)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_bad_threshold(backend, tau):
    with pytest.raises(ValueError, match="threshold"):
        op.spectrum_stats(torch.randn(2, 3, 4), threshold=tau, backend=backend)


def test_raw_op_validates_too(spectrum_ext):
    if not spectrum_ext:
        pytest.skip("extension disabled")
    with pytest.raises(ValueError, match="3-D"):
        torch.ops.ptpeft_fast.singular_values(torch.randn(3, 3), None)
    with pytest.raises(ValueError, match="empty batch"):
        torch.ops.ptpeft_fast.spectrum_stats(torch.randn(0, 3, 3), None, 0.9)
    with pytest.raises(ValueError, match="lengths"):
        torch.ops.ptpeft_fast.singular_values(torch.randn(2, 3, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------- backend choice and fallback


def test_backend_resolution(spectrum_ext):
    x = torch.randn(1, 2, 2)
    with pytest.raises(ValueError, match="not one of"):
        op.singular_values(x, backend="triton")
    assert op.resolve_spectrum_backend("torch", x) == "torch"
    assert op.resolve_spectrum_backend("auto", x) == ("csrc" if spectrum_ext else "torch")
    with use_backend("torch"):
        assert op.resolve_spectrum_backend("auto", x) == "torch"


def test_disabled_extension_uses_torch_path(tmp_path):
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from ptpeft_fast.ops import spectrum as op\n"
        "x = torch.randn(2, 5, 3, dtype=torch.float64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = op.singular_values(x); b = op.singular_values(x); op.spectrum_stats(x)\n"
        "msgs = [str(m.message) for m in w if 'spectrum extension' in str(m.message)]\n"
        "assert msgs == [], msgs  # disabled on purpose: no warning\n"
        "assert op.resolve_spectrum_backend('auto', x) == 'torch'\n"
        "assert torch.allclose(a, torch.linalg.svdvals(x))\n"
        "try:\n"
        "    op.singular_values(x, backend='csrc')\n"
        "except ValueError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('csrc must be refused')\n"
        "print('OK')\n"
    )
    env = dict(os.environ, PTPEFT_FAST_NO_EXT="1", PTPEFT_FAST_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_broken_compiler_falls_back(tmp_path):
    """A compiler that fails must not crash the library: one warning, torch path."""
    code = (
        "import warnings, torch\n"
        "from ptpeft_fast.ops import spectrum as op\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    s = op.singular_values(torch.randn(2, 4, 3))\n"
        "    from ptpeft_fast.ops import prefix_attention\n"  # the decode op falls back as well
        "    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)\n"
        "    o = prefix_attention(q, k, k, torch.randn(2, 3, 8), torch.randn(2, 3, 8), causal=True)\n"
        "assert o.shape == q.shape and torch.isfinite(o).all()\n"
        "assert sum('C++ extension' in str(m.message) for m in w) == 1\n"
        "print('OK')\n"
    )
    env = dict(os.environ, CXX="/bin/false", PTPEFT_FAST_CACHE=str(tmp_path))
    env.pop("PTPEFT_FAST_NO_EXT", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    # a build into an empty cache says so before it starts (it takes about a minute)
    assert "compiling the C++ extension" in res.stderr, res.stderr[-3000:]


# ---------------------------------------------------------------- benchmark cases on tiny shapes


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_spectrum.py"
    spec = importlib.util.spec_from_file_location("_bench_spectrum", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", [(4, 8, 24), (3, 30, 16)])
def test_benchmark_cases_agree_on_tiny_shapes(spectrum_ext, shape):
    """The benchmark's case functions, run once: every route gives the same statistics."""
    bench = _bench_module()
    assert (bench.extension_error() is None) == spectrum_ext  # the suite's own extension check works
    x = bench.make_features(shape, seed=3)
    ref = bench.reference_curve(x)
    cases = bench.CASES if spectrum_ext else {k: v for k, v in bench.CASES.items() if k != "csrc"}
    results = {name: fn(x) for name, fn in cases.items()}
    for name, r in results.items():
        assert float((r.curve - ref).abs().max()) <= bench.CURVE_TOL, name
        assert float(r.effective_rank) == pytest.approx(float(results["svdvals"].effective_rank), rel=1e-4), name
        assert float(r.remaining_rank_ratio) == float(results["svdvals"].remaining_rank_ratio), name
    # The timing helper the csrc case uses for peers filtered out by -k.
    assert len(bench._time(bench.case_gram_eigh, x, 2)) == 2


def test_cached_build_loads_despite_a_leftover_build_lock(tmp_path):
    """A process killed while torch's extension loader held its build lock leaves ``lock`` behind, and
    every later ``load()`` waited on it forever (seen: the suite hung). A cached build loads without
    the lock."""
    import shutil

    assert _ext.load_ext()
    so = next(p for p in map(str, torch.ops.loaded_libraries) if "ptpeft_fast_ext_" in p)
    build = tmp_path / "ext" / os.path.basename(os.path.dirname(so))
    build.mkdir(parents=True)
    shutil.copy(so, build)
    (build / "lock").write_text("")  # fresh: as a killed process leaves it
    env = dict(os.environ, PTPEFT_FAST_CACHE=str(tmp_path))
    env.pop("PTPEFT_FAST_NO_EXT", None)
    code = "from ptpeft_fast import _ext; assert _ext.load_ext(), _ext.ext_error(); print('OK')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
