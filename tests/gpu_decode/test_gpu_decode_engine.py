"""The GPU decode wired into scoring (skipped without a CUDA device and a GPU provider): a slide
scored by a GPU engine reads its tiles with wsi.gpu_decode (patches bound to the backbone's input
on the device) and gives the scores the CPU tile reader gives, within the pixels' max |diff| <= 2."""
from __future__ import annotations

import numpy as np
import pytest

from serving.engine import Engine
from serving.pipeline import SlideScorer
from wsi.gpu_decode import gpu_decode_available

AVAILABLE, REASON = gpu_decode_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no GPU decode here: {REASON}")


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    from bundle_testing import export_test_bundle

    return export_test_bundle(tmp_path_factory.mktemp("gpu-bundle"), "gpu-decode")


def test_gpu_engine_scores_gpu_decoded_tiles_like_the_cpu_reader(gpu_bundle, camelyon_512,
                                                                  monkeypatch, caplog):
    with Engine(gpu_bundle, provider="cuda", precision="fp32", batch_size=32) as engine:
        assert engine.on_gpu
        with caplog.at_level("INFO"):
            on_gpu = SlideScorer(engine).score_slide(camelyon_512)
        assert "GPU decode" in caplog.text
        monkeypatch.setenv("MILROI_GPU_DECODE", "0")
        on_cpu = SlideScorer(engine).score_slide(camelyon_512)
    np.testing.assert_array_equal(on_gpu.coords, on_cpu.coords)
    assert len(on_gpu.scores) > 100
    # Pixels differ by at most 2 levels: scores move little, the slide score barely.
    assert np.abs(on_gpu.scores - on_cpu.scores).max() < 0.05
    assert abs(on_gpu.slide_score - on_cpu.slide_score) < 0.02
