"""The full_frame and tiles views (protoad_jax/views.py; docs/METHOD.md section 5): tile geometry,
resampling and stitching against torch oracles, the views' preprocessing against torchvision,
scoring and regions end to end on a random-init backbone, and their bad inputs.

The backbone is random-init at a 64-pixel input (a 16 x 16 patch grid) to keep the file fast;
the center_crop view is covered unchanged by the existing tests (test_pipeline, test_regions).
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from protoad_jax import (
    Config,
    errors,
    evaluation,
    input_pipeline,
    pipeline,
    prediction,
    preprocess,
    regions,
    views,
    weights,
)
from protoad_jax.datasets import TestItem, demo
from protoad_jax.model import Model, load_model

SMALL = {"resize": 72, "image_size": 64, "num_prototypes": 12, "sigma": 2.0}
TOL = 1e-5  # float32 outputs (ours) vs float64 torch resampling


@pytest.fixture(scope="module")
def variables():
    return weights.random_variables("wide_resnet50_2")


def _photo(path, width, height, seed):
    """A smooth random RGB image (non-constant: hides no one-pixel shift), saved as PNG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    img.save(path)
    return path


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("n,tile,overlap", [(320, 160, 32), (1024, 256, 32), (1024, 512, 64),
                                            (100, 100, 10), (101, 50, 0), (257, 64, 63)])
def test_tile_starts_cover_the_side_exactly(n, tile, overlap):
    starts = np.array(views.tile_starts(n, tile, overlap))
    stride = tile - overlap
    covered = np.zeros(n, int)
    for x in starts:
        covered[x:x + tile] += 1
    print(n, tile, overlap, starts.tolist())
    assert starts[0] == 0 and starts[-1] == n - tile  # flush with both edges
    assert covered.min() >= 1 and len(covered) == n  # every pixel, none outside
    assert np.all(np.diff(starts) <= stride) and np.all(np.diff(starts) > 0)  # overlap >= overlap
    assert np.all(np.diff(starts)[:-1] == stride)  # only the last tile overlaps more
    assert len(starts) == math.ceil((n - tile) / stride) + 1  # the fewest tiles


def test_tiled_size_and_layout():
    assert views.tiled_size(2000, 1000, 1024) == (1024, 512)
    assert views.tiled_size(300, 900, 600) == (200, 600)
    assert views.tiled_size(640, 427, None) == (640, 427)
    lay = views.tile_layout(640, 427, 256, 32, None)
    assert lay.xs == (0, 224, 384) and lay.ys == (0, 171) and lay.num_tiles == 6
    assert lay.boxes[1] == (224, 0, 480, 256)  # row-major


@pytest.mark.parametrize("n_in,n_out", [(8, 20), (64, 256), (256, 64), (224, 97), (50, 50)])
def test_resize_matrix_matches_torch_bilinear_antialias(n_in, n_out):
    m = np.random.default_rng(0).standard_normal((n_in, n_in + 3))
    ours = views.resample(m, n_out, n_out + 5)
    ref = F.interpolate(torch.tensor(m, dtype=torch.float64)[None, None], size=(n_out, n_out + 5),
                        mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
    err = np.abs(ours - ref).max()
    print(f"resample {n_in}->{n_out}: max |ours - torch| = {err:.2e} (tol {TOL})")
    assert err < TOL


def test_stitch_is_the_mean_of_overlapping_tiles():
    lay = views.tile_layout(300, 200, 120, 30, None)
    maps = np.random.default_rng(1).standard_normal((lay.num_tiles, 64, 64)).astype(np.float32)
    total, count = torch.zeros(200, 300, dtype=torch.float64), torch.zeros(200, 300, dtype=torch.float64)
    for m, (x0, y0, x1, y1) in zip(maps, lay.boxes):  # the oracle: torch resize, loop, divide
        up = F.interpolate(torch.tensor(m, dtype=torch.float64)[None, None], size=(120, 120), mode="bilinear",
                           align_corners=False, antialias=True)[0, 0]
        total[y0:y1, x0:x1] += up
        count[y0:y1, x0:x1] += 1
    ref = (total / count).numpy()
    ours = views.stitch(maps, lay)
    err = np.abs(ours - ref).max()
    print(f"stitch: max |ours - torch loop| = {err:.2e} (tol {TOL}); tiles {lay.num_tiles}")
    assert ours.shape == (200, 300) and err < TOL


# ----------------------------------------------------------------------------- preprocessing


def _torchvision(img, size):
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.LANCZOS), T.ToTensor(),
                    T.Normalize(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)])
    return tf(img).permute(1, 2, 0).numpy()


def test_preprocess_frame_and_tiles_match_torchvision(tmp_path):
    path = _photo(tmp_path / "a.png", 150, 97, 0)
    img = Image.open(path).convert("RGB")
    err = np.abs(preprocess.preprocess_frame(path, 64) - _torchvision(img, 64)).max()
    print(f"full_frame vs torchvision Resize((64, 64), LANCZOS): max error {err:.2e} (tol 1e-6)")
    assert err < 1e-6
    tiles, lay = preprocess.preprocess_tiles(path, 64, 48, 8, 120)
    assert (lay.tiled_width, lay.tiled_height) == (120, 78)
    resized = img.resize((120, 78), Image.LANCZOS)
    assert len(tiles) == lay.num_tiles == 3 * 2
    for t, box in zip(tiles, lay.boxes):
        err = np.abs(t - _torchvision(resized.crop(box), 64)).max()
        assert err < 1e-6, (box, err)


def test_frame_masks_are_whole_and_checked_against_the_image(tmp_path):
    _photo(tmp_path / "img.png", 90, 60, 0)
    m = np.zeros((60, 90), np.uint8)
    m[50:60, 80:90] = 255  # a defect in the corner: outside any center crop
    Image.fromarray(m).save(tmp_path / "mask.png")
    item = TestItem(tmp_path / "img.png", "x", 1, tmp_path / "mask.png")
    whole = input_pipeline.load_masks([item], 72, 64, frame=True)[0]
    crop = input_pipeline.load_masks([item], 72, 64)[0]
    ref = np.asarray(Image.fromarray(m).resize((64, 64), Image.NEAREST)) > 0
    assert np.array_equal(whole, ref) and whole.any() and not crop.any()
    Image.fromarray(m[:, :80]).save(tmp_path / "bad_mask.png")
    with pytest.raises(errors.InputError, match="bad_mask.png.*img.png"):
        input_pipeline.load_masks([item._replace(mask_path=tmp_path / "bad_mask.png")], 72, 64,
                                  frame=True)


# ----------------------------------------------------------------------------- settings and inputs


@pytest.mark.parametrize("kw,match", [({"view": "mosaic"}, "view"),
                                      ({"tile_overlap": 256}, "overlap"),
                                      ({"tile_size": 0}, "tile_size"),
                                      ({"tile_image_size": 100}, "tile_image_size")])
def test_bad_view_settings(kw, match):
    with pytest.raises(errors.SettingsError, match=match):
        Config(**kw)


def test_a_tile_larger_than_the_image_names_the_file(tmp_path):
    path = _photo(tmp_path / "small.png", 100, 80, 0)
    config = Config(**SMALL, view="tiles", tile_size=96)
    with pytest.raises(views.TileError, match=r"small.png is 100x80.*--tile_size of at most 80"):
        pipeline.count_inputs([path], config)
    with pytest.raises(views.TileError, match="small.png"):
        preprocess.preprocess_tiles(path, 64, 96, 8, None)


def test_tiles_need_files_and_tfds_needs_center_crop():
    with pytest.raises(errors.SettingsError, match="image paths"):
        pipeline.count_inputs([np.zeros((64, 64, 3), np.float32)], Config(**SMALL, view="tiles"))
    with pytest.raises(errors.SettingsError, match="center crops"):
        evaluation.check_view_dataset("tfds:mvtec_ad", Config(view="full_frame"))


def test_old_model_files_load_as_center_crop(tmp_path):
    model = Model(np.ones((2, 1792), np.float32) / np.sqrt(1792), Config())
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    cfg = json.loads(str(arrays["config"]))
    for k in ("view", "tile_size", "tile_overlap", "tile_image_size"):
        del cfg[k]  # a file written before the views existed
    arrays["config"] = np.array(json.dumps(cfg))
    np.savez(tmp_path / "old.npz", **arrays)
    assert load_model(tmp_path / "old.npz").config.view == "center_crop"


# ----------------------------------------------------------------------------- scoring end to end


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """Normal images of three sizes (different sizes in one category), one of them smaller than
    the model's input (64): allowed in full_frame and tiles."""
    d = tmp_path_factory.mktemp("mixed")
    sizes = [(160, 120), (96, 96), (200, 90), (48, 40)]
    return [_photo(d / f"{i}.png", w, h, i) for i, (w, h) in enumerate(sizes)]


def test_full_frame_scores_the_whole_image_at_any_size(mixed_sizes, variables, tmp_path):
    config = Config(**SMALL, view="full_frame")
    model = pipeline.fit(mixed_sizes, config=config, variables=variables, progress=False)
    assert model.info["num_inputs"] == len(mixed_sizes)
    scored = pipeline.score_images(model, mixed_sizes, variables, batch_size=2, progress=False)
    direct_maps, direct_scores = pipeline.make_scorer(model, variables)(
        np.stack([preprocess.preprocess_frame(p, 64) for p in mixed_sizes]))
    err = np.abs(scored.maps - np.asarray(direct_maps)).max()
    print(f"full_frame score_images vs make_scorer(preprocess_frame): max error {err:.2e} (tol 1e-5)")
    assert err < 1e-5 and np.allclose(scored.scores, direct_scores, atol=1e-5)
    threshold = float(np.median(scored.scores))
    summary = prediction.write_predictions(tmp_path, mixed_sizes, scored, threshold,
                                           root=mixed_sizes[0].parent, resize=72, crop=64,
                                           view="full_frame")
    found = json.loads((tmp_path / "regions.json").read_text())
    assert found["unscored_pixels"].startswith("none") and summary.anomalous >= 1
    for entry in found["images"]:
        w, h = entry["image_size"]
        assert entry["crop_box"] == [0, 0, w, h]
        assert Image.open(tmp_path / entry["mask"]).size == (w, h)
    small = regions.find_frame_regions(scored.maps[3], -1.0, 48, 40)
    assert small.mask.shape == (40, 48) and small.mask.all()  # every pixel scored, none NaN


def test_tiles_stitch_score_and_regions_at_the_original_resolution(mixed_sizes, variables, tmp_path):
    paths = mixed_sizes[:3]  # all at least one 80-pixel tile
    config = Config(**SMALL, view="tiles", tile_size=80, tile_overlap=16)
    model = pipeline.fit(paths, config=config, variables=variables, progress=False)
    layouts = [views.tile_layout(*preprocess.image_size(p), 80, 16, None) for p in paths]
    assert model.info["num_inputs"] == sum(lay.num_tiles for lay in layouts) == 6 + 4 + 6
    scored = pipeline.score_images(model, paths, variables, batch_size=4, progress=False)
    scorer = pipeline.make_scorer(model, variables)
    for i, (p, lay) in enumerate(zip(paths, layouts)):
        tiles, _ = preprocess.preprocess_tiles(p, 64, 80, 16, None)
        tile_maps = np.asarray(scorer(tiles)[0])
        ref = views.stitch(tile_maps, lay)  # the oracle of the stitching itself is above
        err = np.abs(scored.frames[i] - ref).max()
        print(f"tiles {p.name}: stitched vs per-image scorer + stitch max error {err:.2e} (tol 1e-5)")
        assert scored.frames[i].shape == (lay.tiled_height, lay.tiled_width) and err < 1e-5
        assert abs(scored.scores[i] - ref.max()) < 1e-5  # smoothed_max: max of the stitched map
        assert np.abs(scored.maps[i] - views.resample(ref, 64, 64)).max() < 1e-5
    threshold = float(np.min(scored.scores)) - 1e-6  # every image anomalous: all get regions
    prediction.write_predictions(tmp_path, paths, scored, threshold, root=paths[0].parent,
                                 resize=72, crop=64, view="tiles")
    found = json.loads((tmp_path / "regions.json").read_text())
    assert len(found["images"]) == 3 and found["view"] == "tiles"
    for entry, p in zip(found["images"], paths):
        assert entry["image_size"] == list(preprocess.image_size(p))
        overlay = Image.open(tmp_path / "overlays" / f"{p.stem}.png")
        assert overlay.size[1] == preprocess.image_size(p)[1] + 18  # original height + caption


def test_tiles_view_in_the_main_job(tmp_path, variables):
    root = demo.make_demo_dataset(tmp_path / "d", seed=3, n_train=3, n_test_good=2, n_test_bad=2,
                                  size=96, categories=(demo.TEXTURE,))
    net = weights.Backbone(variables, None, "random-init (test)", [])
    config = Config(**SMALL, view="tiles", tile_size=64, tile_overlap=16)
    result = evaluation.run_category("mvtec", root, demo.TEXTURE, tmp_path / "out", config, net,
                                     batch_size=4, progress=False, num_overlays=1)
    print({k: result[k] for k in evaluation.METRICS})
    assert result["pixel_auroc"] is not None and result["fit_info"]["num_inputs"] == 3 * 4
    saved = load_model(tmp_path / "out" / demo.TEXTURE / "model.npz").config
    assert dataclasses.asdict(saved) == dataclasses.asdict(config)
    assert evaluation.settings(config, "x")["view"] == "tiles"


def test_batch_size_for_caps_at_tiles_not_images(tmp_path):
    """predict's batch: ``batch_size`` capped at the inputs, i.e. the tiles in the tiles view
    (oracle: ``min(batch_size, count_inputs)``); an unreadable header leaves ``batch_size``."""
    from protoad_jax import pipeline

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(300, 200), (160, 160)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(paths[-1])
    tiles = Config(view="tiles", tile_size=128, tile_overlap=32)
    for images in (paths[:1], paths):
        n = pipeline.count_inputs(images, tiles)
        for batch in (1, 4, 8, 64):
            got = pipeline.batch_size_for(images, batch, tiles)
            print(len(images), "images", n, "tiles, batch", batch, "->", got)
            assert got == min(batch, n)
            assert pipeline.batch_size_for(images, batch, Config()) == min(batch, len(images))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    assert pipeline.batch_size_for([broken, *paths], 64, tiles) == 64
