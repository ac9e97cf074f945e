from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.data import plots


def _assert_png(path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.width > 200 and image.height > 150
    # Not a blank canvas: a real plot has many distinct colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    return image


def test_size_heatmap_reports_shares_below_threshold(tmp_path):
    h = [100, 300, 500, 200, 1000]
    w = [400, 100, 500, 200, 300]
    shares = plots.plot_size_heatmap(h, w, str(tmp_path / "sub" / "heat.png"), threshold=256)
    assert shares["n"] == 5
    assert shares["share_h_below"] == pytest.approx(2 / 5)
    assert shares["share_w_below"] == pytest.approx(2 / 5)
    assert shares["share_either_below"] == pytest.approx(3 / 5)
    assert shares["share_both_below"] == pytest.approx(1 / 5)
    _assert_png(tmp_path / "sub" / "heat.png")
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp-")]


def test_size_heatmap_of_nothing_still_writes_a_figure(tmp_path):
    shares = plots.plot_size_heatmap([], [], str(tmp_path / "empty.png"))
    assert shares["n"] == 0 and shares["share_either_below"] == 0.0
    assert Image.open(tmp_path / "empty.png").format == "PNG"


def test_size_heatmap_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="orig_h and orig_w"):
        plots.plot_size_heatmap([1, 2], [3], str(tmp_path / "x.png"))


def test_bucket_histogram_orders_by_aspect(tmp_path):
    counts = {"64x128": 5, "128x64": 2, "96x96": 9, "64x256": 1}
    out = plots.plot_bucket_histogram(counts, str(tmp_path / "buckets.png"))
    assert out == {"total": 17, "num_buckets": 4}
    _assert_png(tmp_path / "buckets.png")
    with pytest.raises(ValueError, match="HxW"):
        plots.plot_bucket_histogram({"square": 3}, str(tmp_path / "bad.png"))


def test_reject_reasons_plot(tmp_path):
    out = plots.plot_reject_reasons({"decode_error": 3, "duplicate": 10}, str(tmp_path / "rejects.png"))
    assert out == {"total": 13, "num_reasons": 2}
    _assert_png(tmp_path / "rejects.png")
    with pytest.raises(ValueError, match="negative"):
        plots.plot_reject_reasons({"x": -1}, str(tmp_path / "bad.png"))


def test_plots_write_to_uris(tmp_path):
    uri = f"file://{tmp_path}/remote/heat.png"
    plots.plot_size_heatmap(np.full(10, 300), np.full(10, 120), uri)
    assert (tmp_path / "remote" / "heat.png").stat().st_size > 1000
