"""Every diffusers denoiser class of the pinned diffusers, built small from configs written here (no download).

``DENOISER_CASES`` maps the class name to a builder ``build() -> (model, inputs)`` for
:func:`coverage_run.run_case` (``inputs`` is the dict of keyword arguments of one forward). The builders live in
two files split by class name (``denoiser_cases_a``: A–J, ``denoiser_cases_b``: K–Z);
:func:`all_denoiser_classes` lists what the installed diffusers exports, so a class without a case shows up.
"""

from __future__ import annotations

from coverage_run import Builder
from denoiser_cases_a import CASES as _CASES_A
from denoiser_cases_b import CASES as _CASES_B

DENOISER_CASES: dict[str, Builder] = {**_CASES_A, **_CASES_B}


def all_denoiser_classes() -> list[str]:
    """Names of the denoiser classes the installed diffusers exports: ``UNet*Model``, ``*Transformer*Model`` and
    ``*DiT*Model`` (ControlNets, which are not denoisers, excluded)."""
    import diffusers

    def is_denoiser(n: str) -> bool:
        if not n.endswith("Model"):
            return False
        if n.startswith("UNet"):
            return True
        return ("Transformer" in n or "DiT" in n) and "ControlNet" not in n

    return sorted(n for n in dir(diffusers) if is_denoiser(n))
