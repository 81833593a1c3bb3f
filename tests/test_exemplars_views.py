"""Exemplars' files and boxes in the full_frame and tiles views, against a NumPy transcription of
the views' geometry; update on a tiles model.

Random resnet50 at 64 x 64 (a 16 x 16 patch grid), crops of scikit-learn's sample photos of
three sizes, K = 8, 600 sampled patches. Oracle: each exemplar's model input (image, or tile)
from ``extract_patches(with_index=True)`` and the nearest pass, its tile offsets recomputed here
(``range(0, n - t, t - o)`` then ``n - t``), the patch cell mapped to original pixels and
rounded outwards; then the box painted into a mask and taken through the view with PIL NEAREST:
the 4 x 4 patch cell lies inside it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from protoad_jax import Config, exemplars, explain, pipeline, prediction, regions, update, weights

S = 64
VIEWS = {
    "full_frame": Config(arch="resnet50", image_size=S, num_prototypes=8, max_patches=600,
                         view="full_frame"),
    "tiles": Config(arch="resnet50", image_size=S, num_prototypes=8, max_patches=600,
                    view="tiles", tile_size=128, tile_overlap=32),
    "tiles_resized": Config(arch="resnet50", image_size=S, num_prototypes=8, max_patches=600,
                            view="tiles", tile_size=80, tile_overlap=16, tile_image_size=180),
}


def crops(d, photo, shapes, name):
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (y, x, h, w) in enumerate(shapes):
        paths.append(d / f"{name}_{i}.png")
        Image.fromarray(photo[y:y + h, x:x + w]).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    china, flower = load_sample_images().images
    a = crops(d / "a", china, [(0, 0, 200, 300), (100, 200, 250, 250), (50, 300, 377, 200)], "china")
    b = crops(d / "b", flower, [(0, 0, 220, 260), (150, 300, 200, 200)], "flower")
    return a, b, weights.random_variables("resnet50")


def oracle_inputs(paths, config):
    """Per model input: path, original width and height, and the part of the (tiled) image it
    shows: ``(tw, th)`` the tiled image's size, ``(tx, ty, side)`` the tile in it (full_frame:
    the whole image, side None), transcribed from docs/METHOD.md section 5."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        if config.view == "full_frame":
            out.append({"path": str(p), "w": w, "h": h, "tw": w, "th": h, "tx": 0, "ty": 0,
                        "side": None})
            continue
        tw, th = w, h
        if config.tile_image_size is not None:
            long = max(w, h)
            tw, th = ((config.tile_image_size, max(1, round(h * config.tile_image_size / long)))
                      if w >= h else (max(1, round(w * config.tile_image_size / long)),
                                      config.tile_image_size))
        t, o = config.tile_size, config.tile_overlap
        for y in [*range(0, th - t, t - o), th - t]:
            for x in [*range(0, tw - t, t - o), tw - t]:
                out.append({"path": str(p), "w": w, "h": h, "tw": tw, "th": th, "tx": x, "ty": y,
                            "side": t})
    return out


def oracle_box(inp, r, c):
    """Input pixel u -> tiled pixel tx + u * side / S (full_frame: u * w / S) -> original."""
    fx, fy = inp["w"] / inp["tw"], inp["h"] / inp["th"]
    ux = (inp["side"] or inp["tw"]) / S
    uy = (inp["side"] or inp["th"]) / S
    x = lambda u: (inp["tx"] + u * ux) * fx
    y = lambda u: (inp["ty"] + u * uy) * fy
    return [max(0, math.floor(x(4 * c))), max(0, math.floor(y(4 * r))),
            min(inp["w"], math.ceil(x(4 * c + 4))), min(inp["h"], math.ceil(y(4 * r + 4)))]


def through_view(mask, inp):
    """The mask (original pixels) as the model input ``inp`` sees it, PIL NEAREST."""
    img = Image.fromarray(mask)
    if inp["side"] is None:
        return np.asarray(img.resize((S, S), Image.Resampling.NEAREST)) > 0
    if (inp["tw"], inp["th"]) != (inp["w"], inp["h"]):
        img = img.resize((inp["tw"], inp["th"]), Image.Resampling.NEAREST)
    tile = img.crop((inp["tx"], inp["ty"], inp["tx"] + inp["side"], inp["ty"] + inp["side"]))
    return np.asarray(tile.resize((S, S), Image.Resampling.NEAREST)) > 0


def check_exemplars(ex, prototypes, patches, index, paths, config):
    found = exemplars.nearest(patches, prototypes)
    inputs = oracle_inputs(paths, config)
    which, cell = np.divmod(index[found.patch_index], (S // 4) ** 2)
    for k, (i, (r, c)) in enumerate(zip(which, zip(*np.divmod(cell, S // 4)))):
        inp = inputs[i]
        assert (ex.paths[k], int(ex.rows[k]), int(ex.cols[k])) == (inp["path"], r, c)
        assert ex.boxes[k].tolist() == oracle_box(inp, r, c), (k, inp, r, c)
        mask = np.zeros((inp["h"], inp["w"]), np.uint8)
        b = ex.boxes[k]
        mask[b[1]:b[3], b[0]:b[2]] = 255
        seen = through_view(mask, inp)
        assert seen[4 * r:4 * r + 4, 4 * c:4 * c + 4].all(), (k, inp, r, c, b.tolist())
    print(f"{len(ex.paths)} exemplars: paths, cells and boxes equal the oracle; "
          f"{len(inputs)} model inputs")


@pytest.mark.parametrize("view", list(VIEWS))
def test_exemplar_boxes_follow_the_view_geometry(data, view):
    a, _, variables = data
    config = VIEWS[view]
    fit = pipeline.fit(a, config=config, variables=variables, progress=False)
    patches, index = pipeline.extract_patches(a, variables, config, progress=False, with_index=True)
    check_exemplars(fit.exemplars, fit.prototypes, patches, index, a, config)


def test_update_on_a_tiles_model(data):
    a, b, variables = data
    config = VIEWS["tiles"]
    fit = pipeline.fit(a, config=config, variables=variables, progress=False)
    res = update.update(fit, b, variables, progress=False)
    print(res.line())
    assert res.added > 0  # flower tiles are not covered by a china model (random backbone)
    k0 = fit.num_prototypes
    np.testing.assert_array_equal(res.model.prototypes[:k0], fit.prototypes)
    assert res.model.exemplars.paths[:k0].tolist() == fit.exemplars.paths.tolist()
    # The new exemplars: among the uncovered patches of the new images, through the tiles' geometry.
    patches, index = pipeline.extract_patches(b, variables, config, progress=False, with_index=True)
    uncovered = exemplars.nearest(patches, fit.prototypes).patch_sim < fit.coverage["level"]
    assert uncovered.sum() == res.record["uncovered"]
    new = res.model.exemplars
    added = type(new)(*(getattr(new, f)[k0:] for f in new._fields))
    check_exemplars(added, res.model.prototypes[k0:], patches[uncovered], index[uncovered], b,
                    config)


@pytest.mark.parametrize("view", ["full_frame", "tiles"])
def test_predict_explains_regions_in_the_view(data, view, tmp_path):
    """Oracle: the region's peak pixel centre mapped into every input (NumPy geometry above),
    the input whose centre is nearest, its patch cell; the prototype there is the argmax of the
    NumPy similarities of that input's patches (all patches, extract_patches without budget)."""
    a, b, variables = data
    config = VIEWS[view]
    fit = pipeline.fit(a, config=config, variables=variables, progress=False)
    test = b[0]
    scored = pipeline.score_images(fit, [test], variables, batch_size=2, progress=False)
    frame = scored.frames[0] if scored.frames is not None else scored.maps[0]
    threshold = float(np.quantile(frame, 0.97))  # flags the image, some regions
    prediction.write_predictions(tmp_path, [test], scored, threshold, root=test,
                                 resize=config.resize, crop=config.image_size, view=view,
                                 explainer=explain.ViewExplainer(fit, variables, 2))
    entry = json.loads((tmp_path / "regions.json").read_text())["images"][0]
    found = regions.find_frame_regions(frame, threshold, *Image.open(test).size)
    assert entry["regions"] and len(found.regions) == len(entry["regions"])
    inputs = oracle_inputs([test], config)
    every = dataclasses.replace(config, max_patches=None)
    patches = pipeline.extract_patches([test], variables, every, progress=False)
    sims = (patches.astype(np.float64) @ fit.prototypes.astype(np.float64).T).reshape(
        len(inputs), S // 4, S // 4, -1)
    worst = 0.0
    for r, e in zip(found.regions, (r["explanation"] for r in entry["regions"])):
        px, py = r.peak_at[0] + 0.5, r.peak_at[1] + 0.5
        dist = []
        for inp in inputs:  # the peak in input pixels, through the oracle geometry
            fx, fy = inp["w"] / inp["tw"], inp["h"] / inp["th"]
            u = (px / fx - inp["tx"]) * S / (inp["side"] or inp["tw"])
            v = (py / fy - inp["ty"]) * S / (inp["side"] or inp["th"])
            inside = 0 <= u <= S and 0 <= v <= S
            dist.append(((u - S / 2) ** 2 + (v - S / 2) ** 2 if inside else np.inf, u, v))
        j = int(np.argmin([d[0] for d in dist]))
        _, u, v = dist[j]
        row, col = min(S // 4 - 1, int(v // 4)), min(S // 4 - 1, int(u // 4))
        assert e["patch"] == [row, col] and e.get("tile", 0) == j, (e, j, row, col)
        worst = max(worst, abs(sims[j, row, col, e["prototype"]] - sims[j, row, col].max()),
                    abs(e["similarity"] - sims[j, row, col].max()))
        assert e["exemplar"] == fit.exemplars.entry(e["prototype"])
        assert e["exemplar"]["path"] in {str(p) for p in a}
    print(f"{len(found.regions)} regions: similarity vs NumPy max, max error {worst:.2e} (tol 1e-5)")
    assert worst <= 1e-5  # float32 head and float32 patch embeddings against float64
    assert (tmp_path / entry["closest_look"]).exists()
