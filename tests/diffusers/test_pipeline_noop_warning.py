"""A pipeline whose denoiser ends up with no quantized layer says so loudly, naming the denoiser, its rule and
why (issue: silent no-ops)."""

from __future__ import annotations

import pytest
import tiny_pipelines as tp

import vqsuite
from vqsuite import QuantConfig


def test_quantize_pipeline_that_quantizes_nothing_warns_naming_why() -> None:
    pipe = tp.sd15()
    config = QuantConfig(default=vqsuite.get_preset("w8a16").default, exclude=("*",))
    expected = r"quantize_pipeline quantized NOTHING in StableDiffusionPipeline\.unet"
    with pytest.warns(UserWarning, match=expected) as rec:
        vqsuite.quantize_pipeline(pipe, config)
    msg = next(str(w.message) for w in rec if "quantize_pipeline" in str(w.message))
    assert "UNet2DConditionModel" in msg and "excluded" in msg
    assert not pipe.vqsuite_report.components["unet"].module_report.quantized
