"""Defect regions at the original resolution (protoad_jax.regions) and predict's outputs
(protoad_jax.prediction), against PIL's own resize + crop as the oracle of the geometry.

Sizes cover both orientations of non-square images (300x200, 200x300), downscaling (1000x750),
upscaling (150x120), an image already at the resized size (256x300: no resize), odd sizes, and
the small test configuration (resize 128, crop 112) besides the default (256, 224).
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from protoad_jax import input_pipeline, prediction, preprocess, regions
from protoad_jax.pipeline import ScoredImages

SIZES = [(300, 200), (200, 300), (1000, 750), (150, 120), (257, 511), (256, 300)]
PREPROCESSING = [(256, 224), (128, 112)]


@pytest.mark.parametrize("resize,crop", PREPROCESSING)
@pytest.mark.parametrize("width,height", SIZES)
def test_mapping_matches_pil_nearest_resize_and_crop(width, height, resize, crop):
    """Oracle: an image whose pixels hold their own column (row) index, resized with PIL NEAREST
    and cropped, says which original pixel each crop pixel sampled; ``to_original`` of the crop
    pixel's centre must fall in that original pixel."""
    w = regions.crop_window(width, height, resize, crop)
    box = (w.left, w.top, w.left + crop, w.top + crop)
    worst = 0.0
    for axis, n in ((1, width), (0, height)):
        index = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None] if axis == 0 else
                                np.arange(n, dtype=np.int32)[None, :], (height, width))
        img = Image.fromarray(np.ascontiguousarray(index), "I")
        sampled = np.asarray(img.resize((w.resized_width, w.resized_height), Image.NEAREST).crop(box))
        u = sampled[0] if axis == 1 else sampled[:, 0]
        c = np.arange(crop) + 0.5
        pos = w.to_original(c, 0.0)[0] if axis == 1 else w.to_original(0.0, c)[1]
        # Inside [u, u + 1]: a centre exactly on a pixel edge goes either way in PIL's floats.
        miss = np.maximum(u - pos, pos - (u + 1))
        worst = max(worst, float(miss.max()))
        assert (miss <= 1e-9).all(), (axis, np.flatnonzero(miss > 1e-9), pos[miss > 1e-9], u[miss > 1e-9])
        # Every original pixel PIL sampled lies in the window's box.
        lo, hi = (w.box[0], w.box[2]) if axis == 1 else (w.box[1], w.box[3])
        assert lo <= u.min() and u.max() < hi, (lo, hi, u.min(), u.max())
    print(f"{width}x{height} -> crop {crop}: window box {w.box}; worst overshoot {worst:.2e} px (tol 1e-9)")
    cx, cy = np.random.default_rng(0).uniform(0, crop, (2, 50))
    back = w.to_crop(*w.to_original(cx, cy))
    np.testing.assert_allclose(back, (cx, cy), atol=1e-9)


@pytest.mark.parametrize("width,height", SIZES)
def test_box_is_the_pixels_whose_centres_are_in_the_window(width, height):
    w = regions.crop_window(width, height)
    for n, lo, hi, axis in ((width, w.box[0], w.box[2], 0), (height, w.box[1], w.box[3], 1)):
        c = w.to_crop(np.arange(n) + 0.5, np.arange(n) + 0.5)[axis]
        inside = np.flatnonzero((c >= 0) & (c <= w.crop))
        assert inside.tolist() == list(range(lo, hi)), (axis, lo, hi)


@pytest.mark.parametrize("width,height", SIZES)
def test_known_point_through_lanczos_preprocessing_and_back(width, height):
    """A bright square painted at a known centre goes through the real preprocessing (LANCZOS
    resize + crop); its brightness-weighted centroid in the crop, mapped back, is the centre.

    Tolerance: a symmetric kernel keeps the centroid, up to the uint8 rounding of each resampled
    pixel and the sampling grid's asymmetry: 0.15 original pixels per resized pixel, at least 0.15."""
    rng = np.random.default_rng(width * 7 + height)
    w = regions.crop_window(width, height)
    scale = width / w.resized_width
    side = max(6, round(10 * scale))
    x0, y0, x1, y1 = w.box
    worst = 0.0
    for _ in range(3):
        left = int(rng.integers(x0 + 2 * side, x1 - 3 * side))
        top = int(rng.integers(y0 + 2 * side, y1 - 3 * side))
        img = np.full((height, width, 3), 64, np.uint8)
        img[top:top + side, left:left + side] = 192
        x = preprocess.preprocess_image(Image.fromarray(img))
        v = np.clip((x[..., 0] * 0.229 + 0.485) * 255 - 64, 0, None)  # undo Normalize, red channel
        ys, xs = np.mgrid[: w.crop, : w.crop]
        cx, cy = (xs * v).sum() / v.sum() + 0.5, (ys * v).sum() / v.sum() + 0.5
        got = np.array(w.to_original(cx, cy))
        want = np.array([left + side / 2, top + side / 2])
        worst = max(worst, float(np.abs(got - want).max()))
    tol = 0.15 * max(1.0, scale)
    print(f"{width}x{height}: square side {side}; centroid mapped back, max error {worst:.3f} px (tol {tol:.2f})")
    assert worst <= tol


@pytest.mark.parametrize("width,height,resize,crop", [(256, 300, 256, 224), (512, 512, 256, 224),
                                                       (1024, 512, 256, 224), (224, 400, 224, 224)])
def test_upsample_matches_torch_bilinear_when_aligned(width, height, resize, crop):
    """Oracle: where the crop window covers a whole number of original pixels per map pixel, the
    upsampled window equals torch's bilinear resize (align_corners=False) of the map."""
    m = np.random.default_rng(1).random((crop, crop)).astype(np.float32)
    w = regions.crop_window(width, height, resize, crop)
    up = regions.upsample_to_original(m, w)
    x0, y0, x1, y1 = w.box
    assert x1 - x0 == crop * width // w.resized_width and y1 - y0 == crop * height // w.resized_height
    want = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].double(), size=(y1 - y0, x1 - x0),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    err = float(np.abs(up[y0:y1, x0:x1] - want).max())
    print(f"{width}x{height}: upsampled window vs torch bilinear: max abs err {err:.2e} (tol 1e-6)")
    assert err <= 1e-6
    outside = np.ones(up.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert np.isnan(up[outside]).all() and not np.isnan(up[~outside]).any()


def _painted(width: int, height: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def _boxes_for(w: regions.CropWindow, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Two separate rectangles well inside the window, ~1/6 and ~1/8 of it."""
    x0, y0, x1, y1 = w.box
    bw, bh = x1 - x0, y1 - y0
    a = (x0 + bw // 10, y0 + bh // 10, x0 + bw // 10 + bw // 5, y0 + bh // 10 + bh // 6)
    ox, oy = int(rng.integers(0, bw // 10)), int(rng.integers(0, bh // 10))
    b = (x0 + bw // 2 + ox, y0 + bh // 2 + oy, x0 + bw // 2 + ox + bw // 8, y0 + bh // 2 + oy + bh // 7)
    return [a, b]


@pytest.mark.parametrize("resize,crop", PREPROCESSING)
@pytest.mark.parametrize("width,height", SIZES)
def test_find_regions_recovers_painted_boxes(width, height, resize, crop):
    """Synthetic defects with known boxes: the painted mask goes through PIL's NEAREST resize +
    crop (``preprocess.preprocess_mask``, the ground-truth path) to become a 0/1 anomaly map; the regions
    found at the original resolution must have the painted boxes.

    Tolerance per box edge: NEAREST moves an edge by less than one resized pixel (``s`` original
    pixels, ``s = width / resized_width``); the bilinear upsample thresholded at 0.5 puts it
    halfway between map pixel centres, and the original pixel grid rounds it by up to one pixel:
    ``s + 1``."""
    w = regions.crop_window(width, height, resize, crop)
    boxes = _boxes_for(w, np.random.default_rng(width + height))
    painted = _painted(width, height, boxes)
    amap = preprocess.preprocess_mask(Image.fromarray(painted.astype(np.uint8) * 255), resize, crop).astype(np.float32)
    res = regions.find_regions(amap, 0.5, width, height, resize, crop)
    s = max(width / w.resized_width, height / w.resized_height)
    tol = s + 1
    assert len(res.regions) == 2, res.regions
    assert res.mask.shape == (height, width)
    worst = 0.0
    for want in boxes:
        got = min(res.regions, key=lambda r: np.abs(np.subtract(r.box, want)).max())
        err = float(np.abs(np.subtract(got.box, want)).max())
        worst = max(worst, err)
        assert err <= tol, (got.box, want, err, tol)
        assert got.peak == pytest.approx(1.0)
        c = ((want[0] + want[2] - 1) / 2, (want[1] + want[3] - 1) / 2)  # mean column/row of the pixels
        assert np.abs(np.subtract(got.centroid, c)).max() <= tol, (got.centroid, c)
        pw, ph = want[2] - want[0], want[3] - want[1]
        assert abs(got.area - pw * ph) <= 2 * tol * (pw + ph), (got.area, pw * ph)
    flip = np.logical_xor(res.mask, painted).sum()
    print(f"{width}x{height} (resize {resize}, crop {crop}): 2 regions; max box edge error {worst:.0f} px "
          f"(tol {tol:.2f}); {flip} of {painted.sum()} painted pixels differ")


def test_regions_never_leave_the_crop_window():
    """A defect half outside the crop: its region is clipped to the scored pixels."""
    width, height = 300, 200
    w = regions.crop_window(width, height)
    x0, y0, x1, y1 = w.box
    painted = _painted(width, height, [(10, 50, x0 + 30, 90)])  # starts left of the window
    amap = preprocess.preprocess_mask(Image.fromarray(painted.astype(np.uint8) * 255)).astype(np.float32)
    res = regions.find_regions(amap, 0.5, width, height)
    assert len(res.regions) == 1
    bx0, by0, bx1, by1 = res.regions[0].box
    print("window", w.box, "region", res.regions[0].box)
    assert bx0 == x0 and abs(bx1 - (x0 + 30)) <= 2 and abs(by0 - 50) <= 2 and abs(by1 - 90) <= 2
    outside = np.ones(res.mask.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert not res.mask[outside].any()
    # A map above the threshold everywhere: one region, exactly the window.
    res = regions.find_regions(np.ones((224, 224), np.float32), 0.0, width, height)
    assert [r.box for r in res.regions] == [w.box]
    assert res.regions[0].area == (x1 - x0) * (y1 - y0)


def test_eight_connectivity():
    """Two squares touching only at a corner are one region (8-connected), not two."""
    amap = np.zeros((224, 224), np.float32)
    amap[40:60, 40:60] = 1
    amap[60:80, 60:80] = 1
    res = regions.find_regions(amap, 0.5, 256, 256)  # no resize: map pixels are image pixels
    assert len(res.regions) == 1 and res.regions[0].box == (56, 56, 96, 96), res.regions
    assert res.regions[0].area == 800


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[224, 224\]"):
        regions.find_regions(np.zeros((112, 112)), 0.5, 300, 200)
    with pytest.raises(ValueError, match="threshold"):
        regions.find_regions(np.zeros((224, 224)), float("nan"), 300, 200)
    with pytest.raises(ValueError, match="width"):
        regions.crop_window(0, 200)


def test_write_predictions_csv_json_masks(tmp_path):
    """predict's outputs from known maps: two images with a painted square (300x200 and 200x300),
    one without, one unreadable (skipped). Regions are checked against the painted boxes, the
    mask files against ``find_regions``, the CSV against the inputs, in input order."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    specs = {"wide.png": ((300, 200), (120, 60, 160, 100)), "tall.png": ((200, 300), (50, 120, 90, 170)),
             "plain.png": ((300, 200), None)}
    paths, maps = [], []
    for name, ((width, height), box) in specs.items():
        painted = _painted(width, height, [box] if box else [])
        img = np.where(painted[..., None], 200, 90).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(img).save(inputs / name)
        paths.append(inputs / name)
        maps.append(preprocess.preprocess_mask(Image.fromarray(painted.astype(np.uint8) * 255)).astype(np.float32))
    bad = inputs / "broken.png"
    bad.write_bytes(b"not an image")
    all_paths = sorted(paths + [bad])
    scores = np.array([m.max() for m in maps], np.float32)
    scored = ScoredImages(np.stack(maps), scores, np.stack(maps)[:, ::4, ::4], paths,
                          [input_pipeline.SkippedImage(bad, "cannot decode (UnidentifiedImageError)")])
    out = tmp_path / "out"
    summary = prediction.write_predictions(out, all_paths, scored, 0.5, root=inputs, resize=256, crop=224)
    print(summary.line())
    assert summary.line() == "2 of 3 scored images anomalous; 1 skipped"

    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in all_paths]
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    assert by_name["broken.png"]["status"] == "skipped: cannot decode (UnidentifiedImageError)"
    assert by_name["broken.png"]["score"] == by_name["broken.png"]["anomalous"] == ""
    assert [by_name[n]["anomalous"] for n in ("wide.png", "tall.png", "plain.png")] == ["yes", "yes", "no"]
    assert by_name["wide.png"]["regions"] == "1" and by_name["plain.png"]["regions"] == ""
    assert {r["status"] for n, r in by_name.items() if n != "broken.png"} == {"ok"}

    doc = json.loads((out / "regions.json").read_text())
    print(json.dumps(doc["images"][0], indent=1))
    assert [e["path"] for e in doc["images"]] == [str(inputs / "tall.png"), str(inputs / "wide.png")]
    for entry in doc["images"]:
        (width, height), box = specs[entry["path"].rsplit("/", 1)[1]]
        w = regions.crop_window(width, height)
        assert entry["image_size"] == [width, height] and entry["crop_box"] == list(w.box)
        assert entry["threshold"] == 0.5 and len(entry["regions"]) == 1
        tol = max(width / w.resized_width, height / w.resized_height) + 1
        err = np.abs(np.subtract(entry["regions"][0]["box"], box)).max()
        assert err <= tol, (entry["regions"][0]["box"], box, tol)
        mask = np.asarray(Image.open(out / entry["mask"]))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        expected = regions.find_regions(maps[paths.index(inputs / entry["path"].rsplit("/", 1)[1])], 0.5,
                                        width, height).mask
        assert np.array_equal(mask == 255, expected)
        assert entry["regions"][0]["area"] == int(expected.sum())
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["plain.png", "tall.png", "wide.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["tall.png", "wide.png"]
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"

    # No threshold: decisions unknown, no regions, no masks.
    summary = prediction.write_predictions(tmp_path / "o2", all_paths, scored, None, root=inputs,
                                           resize=256, crop=224)
    assert summary.line() == "3 images scored, no threshold set; 1 skipped"
    assert json.loads((tmp_path / "o2" / "regions.json").read_text())["images"] == []
    assert not (tmp_path / "o2" / "masks").exists()


def test_overlay_outlines_the_regions(tmp_path):
    """The overlay's heatmap panel carries the regions' outline: white exactly on the boundary
    pixels of the region mask brought into the crop frame."""
    from protoad_jax import report

    img = np.zeros((40, 40, 3), np.float32)
    m = np.zeros((40, 40), np.float32)
    region = np.zeros((40, 40), bool)
    region[10:20, 12:30] = True
    plain = np.asarray(report.panel(img, m, None, "t", 0, 1))
    drawn = np.asarray(report.panel(img, m, None, "t", 0, 1, regions=region))
    changed = (plain != drawn).any(axis=2)[18:, 44:]  # the heatmap panel, below the caption
    edge = region.copy()
    edge[11:19, 13:29] = False
    assert np.array_equal(changed, edge)
    assert (drawn[18:, 44:][edge] == 255).all()
