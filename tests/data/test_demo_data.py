from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageFilter

from stages.data import demo_data as dd


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _params(n: int, seed: int = 0, **kwargs) -> list[dict]:
    return [dd.sample_params(np.random.default_rng([seed, i]), i, seed, **kwargs) for i in range(n)]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    dd.generate_demo_dataset(str(tmp_path / "a"), n=10, seed=3, max_side=384)
    dd.generate_demo_dataset(str(tmp_path / "b"), n=10, seed=3, max_side=384)
    dd.generate_demo_dataset(str(tmp_path / "c"), n=10, seed=4, max_side=384)
    a, b, c = _files(str(tmp_path / "a")), _files(str(tmp_path / "b")), _files(str(tmp_path / "c"))
    assert len(a) == 30 and a == b
    assert a != c


def test_share_below_256_and_aspect_coverage():
    params = _params(2000, max_side=1024)
    short = np.array([min(p["orig_h"], p["orig_w"]) for p in params])
    long = np.array([max(p["orig_h"], p["orig_w"]) for p in params])
    aspects = np.array([p["orig_h"] / p["orig_w"] for p in params])
    assert 0.35 <= (short < 256).mean() <= 0.45
    assert short.min() >= 64 and long.max() <= 1024
    assert aspects.min() >= 0.25 - 0.01 and aspects.max() <= 4.0 + 0.05
    # Mostly photo formats (square the most common), and every part of the log range populated by the tail.
    assert 0.3 <= np.isclose(aspects, 1.0, atol=0.02).mean() <= 0.5
    assert 0.85 <= ((aspects >= 0.5) & (aspects <= 2.0)).mean() <= 0.98
    hist, _ = np.histogram(np.log(aspects), bins=8, range=(np.log(0.25), np.log(4.0) + 1e-6))
    assert (hist >= 10).all(), hist
    assert all(p["rendered_large"] == (min(p["orig_h"], p["orig_w"]) < 256) for p in params)
    formats = {p["format"] for p in params}
    assert formats == {"PNG", "JPEG"}


def test_central_placement_at_toy_sizes_for_the_paper_effects():
    """placement=central puts the object around the image centre (as photos frame a subject), and small_side scales
    the share of small, upscaled-looking originals down to a toy training size."""
    params = _params(1000, max_side=128, min_side=8, small_side=32, placement="central")
    short = np.array([min(p["orig_h"], p["orig_w"]) for p in params])
    assert 0.35 <= (short < 32).mean() <= 0.45 and short.min() >= 8
    assert max(max(p["orig_h"], p["orig_w"]) for p in params) <= 128
    assert all(p["rendered_large"] == (m < 32) for p, m in zip(params, short))
    for axis in ("cx", "cy"):
        centres = np.array([p[axis] for p in params])
        assert abs(centres.mean() - 0.5) < 0.01 and 0.06 < centres.std() < 0.1
    x0, y0, x1, y1 = np.array([p["bbox"] for p in params]).T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1).all() and (y1 <= 1).all()
    cells = _params(1000, max_side=128, min_side=8, small_side=32)  # the default spreads objects over the cells
    assert np.array([p["cx"] for p in cells]).std() > 0.2


def test_colour_sets_are_disjoint_and_far_apart():
    assert not set(dd.OBJECT_COLORS) & set(dd.BACKGROUND_COLORS)
    for obj in dd.OBJECT_COLORS.values():
        for bg in dd.BACKGROUND_COLORS.values():
            shades = dd.background_shades(bg)
            dist = np.sqrt(((shades - np.asarray(obj)) ** 2).sum(axis=1))
            assert dist.min() >= dd.MIN_COLOR_DISTANCE, (obj, bg)


def test_caption_metadata_and_pixels_agree(tmp_path):
    summary = dd.generate_demo_dataset(str(tmp_path), n=24, seed=1, max_side=512, folder_size=10)
    assert summary["num_images"] == 24 and summary["num_png"] + summary["num_jpeg"] == 24
    assert os.path.isfile(tmp_path / "00020" / "000023.txt")
    for i in range(24):
        stem = tmp_path / dd.key_for(i, 10)
        params = json.loads((stem.parent / (stem.name + ".json")).read_text())
        caption = (stem.parent / (stem.name + ".txt")).read_text()
        ext = ".jpg" if params["format"] == "JPEG" else ".png"
        image = Image.open(io.BytesIO((stem.parent / (stem.name + ext)).read_bytes()))
        assert image.format == params["format"]
        assert (image.height, image.width) == (params["orig_h"], params["orig_w"])
        assert caption == dd.caption_for(params)
        assert caption.split(" ", 1)[1].startswith(f"{params['color']} {params['shape']} ")
        assert f"on a {params['background']}" in caption
        assert dd.position_name(params["cx"], params["cy"]) in caption
        # The object is found by its colour, where the metadata says it is.
        mask = dd.segment_object(np.asarray(image.convert("RGB")), params["color_rgb"])
        assert mask.sum() > 20
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = params["bbox"]
        assert x0 - 0.03 <= xs.min() / image.width and xs.max() / image.width <= x1 + 0.03
        assert y0 - 0.03 <= ys.min() / image.height and ys.max() / image.height <= y1 + 0.03


def test_background_alone_has_no_object_pixels():
    for p in _params(30, seed=7):
        image = dd._background(p["orig_h"], p["orig_w"], p)
        assert not dd.segment_object(np.asarray(image), p["color_rgb"]).any()


def test_position_names_cover_the_grid():
    assert dd.position_name(0.1, 0.1) == "in the top left"
    assert dd.position_name(0.5, 0.5) == "in the center"
    assert dd.position_name(0.9, 0.5) == "on the right"
    assert dd.position_name(0.5, 0.9) == "at the bottom"


def _high_frequency_energy(image: Image.Image) -> float:
    """Mean squared high-pass response: a blurred edge spreads its step over many pixels, so its square sums lower."""
    # Per channel: an object and its background may share a luminance (green on some backgrounds), not a colour.
    rgb = image.convert("RGB")
    sharp = np.asarray(rgb, dtype=np.float32)
    blurred = np.asarray(rgb.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    return float(((sharp - blurred) ** 2).mean())


def test_small_images_really_are_low_resolution():
    factor = 4
    smalls = [p for p in _params(60, seed=2) if p["rendered_large"]][:5]
    assert smalls
    for small in smalls:
        _assert_low_res(small, factor)


def _assert_low_res(small: dict, factor: int) -> None:
    upscaled = dd.render(small).resize((small["orig_w"] * factor, small["orig_h"] * factor),
                                       Image.Resampling.BICUBIC)
    native = dict(small, orig_h=small["orig_h"] * factor, orig_w=small["orig_w"] * factor, render_scale=1,
                  rendered_large=False)
    assert _high_frequency_energy(upscaled) < 0.5 * _high_frequency_energy(dd.render(native))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="small_share"):
        dd.generate_demo_dataset(str(tmp_path), n=1, small_share=1.5)
    with pytest.raises(ValueError, match="max_side"):
        dd.generate_demo_dataset(str(tmp_path), n=1, max_side=100)
    with pytest.raises(ValueError, match="placement"):
        dd.generate_demo_dataset(str(tmp_path), n=1, placement="random")
    with pytest.raises(ValueError, match="min_side"):
        dd.generate_demo_dataset(str(tmp_path), n=1, min_side=40, small_side=32, max_side=128)


def _cfg(out_dir: str, n: int, seed: int = 0):
    return OmegaConf.create({"demo": {"out_dir": out_dir, "num_images": n, "seed": seed, "max_side": 320,
                                      "min_side": 64, "small_share": 0.4, "jpeg_share": 0.5, "render_scale": 4,
                                      "folder_size": 500}})


def test_run_is_resumable_and_replaces_its_own_output(tmp_path, make_ctx):
    out = str(tmp_path / "demo")
    ctx = make_ctx("demo_data")
    first = dd.run(_cfg(out, 6), ctx)
    assert first["skipped"] is False and first["num_images"] == 6
    again = dd.run(_cfg(out, 6), ctx)
    assert again["skipped"] is True and again["num_images"] == 6
    smaller = dd.run(_cfg(out, 3), ctx)
    assert smaller["skipped"] is False
    images = [n for n in _files(out) if n.endswith((".png", ".jpg"))]
    assert len(images) == 3  # the earlier, larger set was replaced, not mixed in


def test_run_refuses_a_folder_it_did_not_write(tmp_path, make_ctx):
    out = tmp_path / "someone_else"
    out.mkdir()
    (out / "precious.jpg").write_bytes(b"data")
    with pytest.raises(FileExistsError, match="demo.out_dir"):
        dd.run(_cfg(str(out), 2), make_ctx("demo_data"))
    assert (out / "precious.jpg").exists()
