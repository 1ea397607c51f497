"""FID and KID: features from a local extractor, statistics cached per dataset, the Frechet distance by eigenvalues.

Three routes, same features (the TF FID Inception behind the documented resize, :mod:`vqsuite.evals.inception`):

* ``backend="eig"`` (default): ``(mu, sigma)`` per set, cached as safetensors per dataset, and
  :func:`frechet_distance` with ``tr sqrt(S1 S2)`` from the symmetric eigenproblem ``sqrt(S1) S2 sqrt(S1)``
  (float64; a few seconds at 2048 dims on 2 CPU cores, where ``scipy.linalg.sqrtm`` takes minutes).
* ``backend="torchmetrics"``: torchmetrics' ``FrechetInceptionDistance(feature=<module>)`` fed the same features
  (its own math: ``eigvals(S1 @ S2)``); matches ``eig`` to float64 round-off (tested).
* ``backend="cleanfid"``: clean-fid's ``compute_fid`` on two PNG folders with ``custom_feat_extractor`` (its own
  resize = ours; its ``scipy.linalg.sqrtm`` is slow at 2048 dims).

KID goes through torchmetrics' ``KernelInceptionDistance`` on cached features.

API::

    net = load_inception()                                     # or any extractor: uint8 [N,3,H,W] -> [N, D]
    feats = extract_features(images_uint8, net)                # float32 [N, D]
    ref = cached_stats("fashion-mnist-test", lambda: imgs, net, cache_dir="~/.cache/vqsuite/fid")
    r = compute_fid(ref, fake_images, net)                     # FIDResult(fid=..., n_a=..., n_b=..., resize=...)
    str(r)  # 'FID 37.71 (N=500 vs 500; PIL bicubic to 299x299 ...; tf-inception-2015-12-05)'
    kid_mean, kid_std = compute_kid(feats_a, feats_b, subset_size=100)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.errors import ConfigError, UserError
from vqsuite.evals.distributed import sharded_map
from vqsuite.evals.inception import RESIZE, to_uint8_nchw

logger = logging.getLogger(__name__)

#: what ``compute_fid`` accepts for each side: images (uint8 [N,3,H,W] / float 0-1), a folder, features, or stats
ImageSource = Any
#: stats cache file format version
STATS_VERSION = 1


def extractor_name(extractor: nn.Module | Callable) -> str:
    return str(getattr(extractor, "name", None) or type(extractor).__name__)


# ----------------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(
    images: torch.Tensor | str | os.PathLike,
    extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 16,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """float32 ``[N, D]`` features of ``images`` (uint8 ``[N,3,H,W]``, float in [0,1], or an image folder).

    ``extractor`` receives uint8 ``[B, 3, H, W]`` batches (the FID Inception resizes them itself). With an
    ``accelerator`` the batches are spread over processes and gathered in order.
    """
    if isinstance(images, (str, os.PathLike)):
        from vqsuite.evals.images import load_images

        images = load_images(images)
    x = to_uint8_nchw(images)
    return sharded_map(
        lambda idx: extractor(x[idx]).float().cpu(),
        x.shape[0],
        batch_size=batch_size,
        accelerator=accelerator,
        desc=desc,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Mean and covariance of a set's features: ``mu [D]`` and ``sigma [D, D]`` float64 (unbiased, N - 1),
    ``n`` images; ``features [N, D]`` float32 are kept when known (KID needs them)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    extractor: str = ""
    resize: str = RESIZE
    features: torch.Tensor | None = None

    @classmethod
    def from_features(cls, feats: torch.Tensor, extractor: str = "", keep: bool = True) -> FeatureStats:
        f = feats.double()
        if f.shape[0] < 2:
            raise UserError(f"FID needs at least 2 images per set, got {f.shape[0]}")
        mu = f.mean(0)
        c = f - mu
        sigma = c.T @ c / (f.shape[0] - 1)
        return cls(mu, sigma, int(f.shape[0]), extractor, RESIZE, feats.float() if keep else None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors (atomic: temp file + rename); metadata holds n, extractor, resize, version."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}
        if self.features is not None:
            tensors["features"] = self.features.contiguous()
        meta = {"n": str(self.n), "extractor": self.extractor, "resize": self.resize, "version": str(STATS_VERSION)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta.get("version") != str(STATS_VERSION):
            raise UserError(f"{path}: stats version {meta.get('version')!r}, expected {STATS_VERSION}")
        return cls(
            t["mu"], t["sigma"], int(meta["n"]), meta.get("extractor", ""), meta.get("resize", ""), t.get("features")
        )


def stats_cache_path(cache_dir: str | os.PathLike, name: str, extractor: str, extra: dict | None = None) -> Path:
    """``{cache_dir}/{name}-{hash}.safetensors``, the hash covering extractor, resize and ``extra``."""
    key = json.dumps({"extractor": extractor, "resize": RESIZE, **(extra or {})}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return Path(cache_dir).expanduser() / f"{safe}-{digest}.safetensors"


def cached_stats(
    name: str,
    images: ImageSource | Callable[[], ImageSource],
    extractor: nn.Module | Callable,
    cache_dir: str | os.PathLike | None,
    *,
    batch_size: int = 16,
    accelerator: Any = None,
    progress: bool = True,
    extra: dict | None = None,
) -> FeatureStats:
    """Reference statistics of dataset ``name``, computed once and cached in ``cache_dir`` (no cache if ``None``).

    ``images`` may be a zero-argument callable, only called on a cache miss. ``extra`` (e.g. ``{"n": 500,
    "split": "test"}``) goes into the cache key. Only the main process writes the file.
    """
    path = stats_cache_path(cache_dir, name, extractor_name(extractor), extra) if cache_dir is not None else None
    if path is not None and path.is_file():
        logger.info("FID reference stats for %s from %s", name, path)
        return FeatureStats.load(path)
    src = images() if callable(images) and not isinstance(images, nn.Module) else images
    feats = extract_features(
        src, extractor, batch_size=batch_size, accelerator=accelerator, progress=progress, desc=f"features {name}"
    )
    stats = FeatureStats.from_features(feats, extractor_name(extractor))
    if path is not None and (accelerator is None or accelerator.is_main_process):
        stats.save(path)
        logger.info("cached FID reference stats for %s in %s", name, path)
    return stats


# ----------------------------------------------------------------------------------------------- the distance
def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite ``[D, D]`` matrix through ``eigh`` (negative round-off
    eigenvalues clamped to 0)."""
    a = (a + a.T) / 2
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``tr sqrt(S1 S2)`` for PSD ``S1, S2``: ``S1 S2`` is similar to the PSD ``sqrt(S1) S2 sqrt(S1)``, so the
    trace is the sum of square roots of that symmetric matrix's eigenvalues (two ``eigh``, no ``sqrtm``)."""
    r = sqrtm_psd(s1.double())
    m = r @ s2.double() @ r
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return w.clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` in float64."""
    mu1, mu2, s1, s2 = mu1.double(), mu2.double(), s1.double(), s2.double()
    d = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt_product(s1, s2))
    return max(d, 0.0)


# ----------------------------------------------------------------------------------------------- front ends
@dataclass
class FIDResult:
    """One FID value with what it was measured on (``str()`` prints it with N and the resize)."""

    fid: float
    n_a: int
    n_b: int
    extractor: str
    backend: str
    resize: str = RESIZE

    def __str__(self) -> str:
        return f"FID {self.fid:.2f} (N={self.n_a} vs {self.n_b}; {self.resize}; {self.extractor}; {self.backend})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Precomputed(nn.Module):
    """Identity "extractor" so torchmetrics' FID/KID take features we already computed (and cached)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _features(src: ImageSource, extractor: Any, **kw: Any) -> torch.Tensor:
    if isinstance(src, FeatureStats):
        if src.features is None:
            raise UserError("these stats carry no features; this backend needs them (use backend='eig')")
        return src.features
    if extractor is None:
        raise UserError("an extractor is needed to turn images into features (see vqsuite.evals.load_inception)")
    return extract_features(src, extractor, **kw)


def _stats(src: ImageSource, extractor: Any, **kw: Any) -> FeatureStats:
    if isinstance(src, FeatureStats):
        return src
    return FeatureStats.from_features(_features(src, extractor, **kw), extractor_name(extractor), keep=False)


def fid_torchmetrics(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """torchmetrics' ``FrechetInceptionDistance`` on precomputed features ``[N, D]`` (a = "real", b = "fake")."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Precomputed(feats_a.shape[1]))
    m.update(feats_a.double(), real=True)
    m.update(feats_b.double(), real=False)
    return float(m.compute())


def compute_kid(
    a: ImageSource, b: ImageSource, extractor: Any = None, *, subsets: int = 100, subset_size: int = 1000, **kw: Any
) -> tuple[float, float]:
    """KID ``(mean, std)`` through torchmetrics' ``KernelInceptionDistance`` (``subset_size`` capped at the smaller N).

    ``a``/``b``: images, folders, or :class:`FeatureStats` with features. Subsets are drawn from torch's global RNG.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    fa, fb = _features(a, extractor, **kw), _features(b, extractor, **kw)
    size = min(subset_size, fa.shape[0], fb.shape[0])
    m = KernelInceptionDistance(feature=_Precomputed(fa.shape[1]), subsets=subsets, subset_size=size)
    m.update(fa.double(), real=True)
    m.update(fb.double(), real=False)
    mean, std = m.compute()
    return float(mean), float(std)


def fid_cleanfid(
    images_a: torch.Tensor | str | os.PathLike,
    images_b: torch.Tensor | str | os.PathLike,
    extractor: Any,
    *,
    batch_size: int = 16,
) -> float:
    """clean-fid's ``compute_fid`` (mode ``"clean"``) between two image sets with ``custom_feat_extractor``.

    Tensors are written to temporary PNG folders first. ``extractor.forward_resized`` (float ``[B,3,299,299]`` in
    0..255, clean-fid's contract) is used when present, else the extractor itself.
    """
    from cleanfid import fid as cfid

    from vqsuite.evals.images import save_images

    fn = getattr(extractor, "forward_resized", extractor)

    def feat(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x.float())

    with tempfile.TemporaryDirectory(prefix="vqsuite-cleanfid-") as tmp:
        dirs = []
        for i, src in enumerate((images_a, images_b)):
            if isinstance(src, (str, os.PathLike)):
                dirs.append(str(src))
            else:
                save_images(src, Path(tmp) / f"set{i}")
                dirs.append(str(Path(tmp) / f"set{i}"))
        return float(
            cfid.compute_fid(
                dirs[0],
                dirs[1],
                mode="clean",
                custom_feat_extractor=feat,
                device=torch.device("cpu"),
                num_workers=0,
                batch_size=batch_size,
                verbose=False,
                use_dataparallel=False,
            )
        )


def compute_fid(
    a: ImageSource,
    b: ImageSource,
    extractor: Any = None,
    *,
    backend: str = "eig",
    batch_size: int = 16,
    accelerator: Any = None,
    progress: bool = True,
) -> FIDResult:
    """FID between two sets.

    Args:
        a, b: uint8 images ``[N, 3, H, W]`` (or float in [0, 1]), an image folder, or :class:`FeatureStats`
            (e.g. from :func:`cached_stats`; the ``torchmetrics`` backend needs stats that kept their features).
        extractor: uint8 images -> ``[N, D]`` features (:func:`vqsuite.evals.load_inception` for the real FID).
        backend: ``"eig"`` (default), ``"torchmetrics"`` or ``"cleanfid"`` (images or folders only), see the
            module docstring.
    """
    kw = dict(batch_size=batch_size, accelerator=accelerator, progress=progress)
    name = extractor_name(extractor) if extractor is not None else (getattr(a, "extractor", "") or "")
    if backend == "eig":
        sa, sb = _stats(a, extractor, **kw), _stats(b, extractor, **kw)
        return FIDResult(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), sa.n, sb.n, name, backend)
    if backend == "torchmetrics":
        fa, fb = _features(a, extractor, **kw), _features(b, extractor, **kw)
        return FIDResult(fid_torchmetrics(fa, fb), fa.shape[0], fb.shape[0], name, backend)
    if backend == "cleanfid":
        if isinstance(a, FeatureStats) or isinstance(b, FeatureStats):
            raise UserError("backend='cleanfid' takes images or folders, not cached stats")
        from vqsuite.evals.images import list_images

        def count(x: Any) -> int:
            return len(list_images(x)) if isinstance(x, (str, os.PathLike)) else to_uint8_nchw(x).shape[0]

        return FIDResult(fid_cleanfid(a, b, extractor, batch_size=batch_size), count(a), count(b), name, backend)
    raise ConfigError(f"{backend=} must be one of 'eig', 'torchmetrics', 'cleanfid'")
