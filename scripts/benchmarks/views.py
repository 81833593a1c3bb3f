"""views: center_crop vs full_frame vs tiles on real photographs with synthetic defects, and
what each view costs, in one run (issue 19, item 3; docs/evaluation.md, "Views").

  python scripts/benchmarks/views.py            # ~6 min on 2 cores; prints three tables

Images: seeded square crops of ONE texture, the dahlia of scikit-learn's sample photograph
flower.jpg (``load_sample_images``, bundled with scikit-learn; nothing is downloaded; crops of
150-190 px inside its petals, randomly flipped), so the normal images are homogeneous,
with one synthetic defect per defective test image, conspicuous in colour (a near-black hole, a
blue stain or a green scratch on orange petals; the mask is exactly the changed pixels):
  1. "outer band": 320 x 320 crops, the defect inside the band the center crop never scores
     (the outer 1/16 of the side along each edge: 20 px);
  2. "small defects": 1,024 x 1,024 crops (upscaled), defects anywhere, each under 0.5% of
     the image area.
Each view fits its own model on the same normal images (K prototypes, FINCH, --max_patches
patches), calibrates its threshold on held-out normal images (0.99 quantile of their scores,
``pipeline.calibrate_threshold``) and scores the same test images. Printed per view:
  * pixel AUROC over every original pixel of the test images (the map brought to the original
    resolution: ``regions.upsample_to_original`` / ``upsample_frame``); pixels a view does not
    score (center_crop's outer band) rank below every scored pixel (never detected);
  * detected: the fraction of defects overlapped by a predicted region (regions at the original
    resolution, above the calibrated threshold), and false alarms: the fraction of normal test
    images with any region;
  * peak in defect: the fraction of defects overlapped by the region at a threshold set per
    image just below that image's own maximum (its highest-scoring pixel lies in the defect):
    localisation without a threshold, informative when the calibrated one finds no region;
  * images/s: test images per second of ``score_images`` (compiled: the calibration pass ran
    first with the same batch shape), every view on the same images in the same run.
The backbone is random-init WideResNet-50-2 unless --weights is given (the ImageNet file cannot
be downloaded here): absolute numbers are not ProtoAD's; the comparison between views is what
this measures.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import harness
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from protoad_jax import Config, metrics, pipeline, preprocess, regions, weights

FLAGS = flags.FLAGS
flags.DEFINE_string("views_dir", "/tmp/protoad_views", "Where the generated images go.")
flags.DEFINE_integer("views_k", 100, "Prototypes per model.")
flags.DEFINE_integer("views_max_patches", 10000, "Training patches per model (seeded sample).")
flags.DEFINE_integer("views_batch", 8, "Inputs (images or tiles) per jitted call.")


TEXTURE = (215, 125, 405, 315)  # x0, y0, x1, y1: a square inside the dahlia of flower.jpg


def _crop(rng, photo, side: int) -> Image.Image:
    x0, y0, x1, y1 = TEXTURE
    s = int(rng.integers(150, 191))
    y, x = int(rng.integers(y0, y1 - s + 1)), int(rng.integers(x0, x1 - s + 1))
    img = Image.fromarray(photo[y:y + s, x:x + s])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.resize((side, side), Image.LANCZOS)


def _defect(img: Image.Image, kind: str, centre: tuple[float, float], r: float,
            angle: float) -> tuple[Image.Image, np.ndarray]:
    """Paints one defect of radius ``r`` around ``centre`` (x, y); returns the image and the
    mask of the pixels that changed."""
    a = np.asarray(img, np.float64)
    side = a.shape[0]
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    dx, dy = xx - centre[0], yy - centre[1]
    if kind == "hole":
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / r
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (0.6 * r)
        alpha = np.clip((1 - np.hypot(u, v)) * r * 0.6 + 0.5, 0, 1)
        rgb = np.array([15.0, 13.0, 16.0])
    elif kind == "stain":
        alpha = 0.9 * np.exp(-(dx ** 2 + dy ** 2) / (2 * (r / 2) ** 2)) * (np.hypot(dx, dy) < r)
        rgb = np.array([30.0, 80.0, 220.0])
    else:  # scratch: a bright line of length 3r through the centre
        canvas = Image.new("L", (side, side), 0)
        d = 1.5 * r * np.array([np.cos(angle), np.sin(angle)])
        ImageDraw.Draw(canvas).line([tuple(centre - d), tuple(centre + d)], fill=255,
                                    width=max(2, round(r / 5)))
        alpha = np.asarray(canvas, np.float64) / 255
        rgb = np.array([20.0, 120.0, 60.0])
    out = np.clip(np.rint(a * (1 - alpha[..., None]) + rgb * alpha[..., None]), 0, 255).astype(np.uint8)
    mask = np.any(out != np.asarray(img), axis=-1)
    return Image.fromarray(out), mask


def make_set(root: Path, photo, side: int, seed: int, counts: dict[str, int], place) -> dict:
    """Writes train/val/good/bad images; returns ``{split: [paths]}`` and the bad images' masks."""
    rng = np.random.default_rng(seed)
    out: dict = {k: [] for k in counts}
    out["masks"] = []
    kinds = ("hole", "stain", "scratch")
    for split, n in counts.items():
        for i in range(n):
            img = _crop(rng, photo, side)
            if split == "bad":
                centre, r = place(rng, side)
                img, mask = _defect(img, kinds[i % 3], centre, r, rng.uniform(0, np.pi))
                out["masks"].append(mask)
            path = root / split / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            out[split].append(path)
    return out


def outer_band(rng, side):
    """A defect centre inside the band the center crop leaves out (side / 16 wide)."""
    band = side / 16
    r = rng.uniform(7, 9) * side / 320
    depth = rng.uniform(r * 0.6, band - 2)
    along = rng.uniform(band, side - band)
    edge = rng.integers(4)
    x, y = [(depth, along), (side - depth, along), (along, depth), (along, side - depth)][edge]
    return np.array([x, y]), r


def anywhere(rng, side):
    r = rng.uniform(8, 20) * side / 1024
    return rng.uniform(3 * r, side - 3 * r, 2), r


def original_map(scored, i: int, path: Path, config: Config) -> np.ndarray:
    w, h = preprocess.image_size(path)
    if config.view == "center_crop":
        window = regions.crop_window(w, h, config.resize, config.image_size)
        return regions.upsample_to_original(scored.maps[i], window)
    frame = scored.frames[i] if scored.frames is not None else scored.maps[i]
    return regions.upsample_frame(frame, w, h)


def run_view(data: dict, config: Config, variables) -> dict:
    model = pipeline.fit(data["train"], config=config, variables=variables,
                         batch_size=FLAGS.views_batch, progress=False)
    val = pipeline.score_images(model, data["val"], variables, batch_size=FLAGS.views_batch,
                                progress=False)  # also compiles the scorer for the timed pass
    threshold, _ = pipeline.calibrate_threshold(val.scores)
    test = data["good"] + data["bad"]
    t0 = time.perf_counter()
    scored = pipeline.score_images(model, test, variables, batch_size=FLAGS.views_batch,
                                   progress=False)
    seconds = time.perf_counter() - t0
    maps, masks, detected, alarms, peaks = [], [], [], [], []
    for i, p in enumerate(test):
        up = original_map(scored, i, p, config)
        found = regions.regions_above(up, threshold, None).mask
        bad = i >= len(data["good"])
        gt = data["masks"][i - len(data["good"])] if bad else np.zeros(up.shape, bool)
        (detected if bad else alarms).append(bool((found & gt).any() if bad else found.any()))
        if bad:  # unscored (NaN) pixels never hold the peak
            peaks.append(bool(gt[up == np.nanmax(up)].any()))
        maps.append(up)
        masks.append(gt)
    maps = np.stack(maps)
    lowest = np.nanmin(maps) - 1.0  # unscored pixels rank below every scored one
    auroc = metrics.pixel_auroc(np.stack(masks), np.where(np.isnan(maps), lowest, maps))
    inputs = model.info["num_inputs"] / len(data["train"])
    return {"pixel_auroc": auroc, "detected": float(np.mean(detected)), "peak": float(np.mean(peaks)),
            "false_alarms": float(np.mean(alarms)), "img_s": len(test) / seconds,
            "inputs_per_image": inputs, "fit_s": model.info["seconds_features"]
            + model.info["seconds_clustering"]}


def main(argv):
    del argv
    from sklearn.datasets import load_sample_images

    start = time.perf_counter()
    samples = load_sample_images()
    photo = samples.images[[Path(f).name for f in samples.filenames].index("flower.jpg")]
    if FLAGS.weights:
        variables, backbone = weights.load_backbone(FLAGS.weights), FLAGS.weights
    else:
        variables, backbone = weights.random_variables("wide_resnet50_2"), "random-init"
    root = Path(FLAGS.views_dir)
    base = Config(num_prototypes=FLAGS.views_k, max_patches=FLAGS.views_max_patches)
    band = make_set(root / "band", photo, 320, 0,
                    {"train": 10, "val": 4, "good": 5, "bad": 9}, outer_band)
    small = make_set(root / "small", photo, 1024, 1,
                     {"train": 5, "val": 3, "good": 3, "bad": 6}, anywhere)
    area = max(m.mean() for m in small["masks"])
    studies = [
        ("outer band", band, [("center_crop", base),
                              ("full_frame", dataclasses.replace(base, view="full_frame")),
                              ("tiles 160/32", dataclasses.replace(base, view="tiles", tile_size=160,
                                                                   tile_overlap=32))]),
        ("small defects", small, [("center_crop", base),
                                  ("full_frame", dataclasses.replace(base, view="full_frame")),
                                  ("tiles 512/64", dataclasses.replace(base, view="tiles", tile_size=512,
                                                                       tile_overlap=64)),
                                  ("tiles 256/32", dataclasses.replace(base, view="tiles", tile_size=256,
                                                                       tile_overlap=32))]),
    ]
    tables, speed = [], harness.Table("Cost of each view (score_images, compiled, same run)",
                                      ["images", "view", "inputs per image", "images/s", "fit s"])
    for name, data, cases in studies:
        t = harness.Table(f"{name}: {len(data['bad'])} defective + {len(data['good'])} normal test "
                          f"images, {Image.open(data['train'][0]).size[0]} px",
                          ["view", "pixel AUROC (original pixels)", "defects detected",
                           "false alarms (normal images)", "peak in defect"])
        for label, config in cases:
            r = run_view(data, config, variables)
            print(f"{name} {label}: {r}", file=sys.stderr, flush=True)
            t.add(label, round(r["pixel_auroc"], 4), f"{r['detected']:.2f}", f"{r['false_alarms']:.2f}",
                  f"{r['peak']:.2f}")
            speed.add(f"{Image.open(data['train'][0]).size[0]} px", label,
                      round(r["inputs_per_image"], 1), round(r["img_s"], 2), round(r["fit_s"], 1))
        tables.append(t)
    tables[1].notes.append(f"largest defect: {100 * area:.3f}% of the image area (all < 0.5%)")
    tables.append(speed)
    notes = [(f"backbone: {backbone} WideResNet-50-2; K = {FLAGS.views_k} FINCH prototypes on "
              f"{FLAGS.views_max_patches} sampled patches; image_size 224; batch {FLAGS.views_batch}; "
              "defects detected / false alarms: regions above the calibrated threshold (0.99 "
              "quantile of held-out normal images' scores); peak in defect: the region at a "
              "threshold just below each image's own maximum (its top pixel in the defect); "
              f"total {time.perf_counter() - start:.0f} s"), *harness.machine()[:1]]
    for t in tables:
        t.print()
    print("\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    flags.adopt_module_key_flags(harness)
    app.run(main)
