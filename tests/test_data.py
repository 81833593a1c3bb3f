"""preprocess.py, input_pipeline.py and datasets/ against torchvision's transforms (the reference pipeline), readers on generated layouts,
the threaded batch loader, and the demo dataset generator."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import make_btad_like
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms as T

from protoad_jax import datasets, errors, input_pipeline, preprocess
from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD
from protoad_jax.datasets import demo

TOL = 1e-6


def torchvision_image(path: Path, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The reference: convert("RGB"), Resize(LANCZOS), CenterCrop, ToTensor, Normalize."""
    tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.LANCZOS), T.CenterCrop(crop),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        return tf(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)


def torchvision_mask(path: Path, resize: int = 256, crop: int = 224) -> np.ndarray:
    tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.NEAREST),
                    T.CenterCrop(crop)])
    return np.asarray(tf(Image.open(path))) > 0


def china() -> np.ndarray:
    return load_sample_images().images[0]  # 427 x 640 x 3 uint8


def save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# ----------------------------------------------------------------------------- preprocessing


def _image_cases(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    img = china()
    gray = np.asarray(Image.fromarray(img).convert("L"))
    alpha = rng.integers(0, 256, img.shape[:2], dtype=np.uint8)
    cases = {f"sklearn_{Path(f).name}": Path(f) for f in load_sample_images().filenames}
    cases.update({
        "portrait_640x427": save(np.ascontiguousarray(img.transpose(1, 0, 2)),
                                 tmp / "portrait.png"),
        "grayscale": save(gray, tmp / "gray.png"),
        "rgba": save(np.dstack([img, alpha]), tmp / "rgba.png"),
        "palette": tmp / "palette.png",
        # Resized long side 297: crop offset 36.5 rounds (half to even) to 36; an exact-size
        # image is passed through unresized.
        "odd_297x256": save(img[100:356, 50:347], tmp / "odd_297.png"),
        # 351x300 -> 299x256: crop offset 37.5 rounds to 38.
        "odd_351x300": save(img[50:350, 100:451], tmp / "odd_351.png"),
        "upsampled_150x200": save(img[:200, :150], tmp / "small.png"),
    })
    Image.fromarray(img).quantize(64).save(cases["palette"])
    return cases


def test_preprocess_image_matches_torchvision(tmp_path):
    for name, path in _image_cases(tmp_path).items():
        got = preprocess.preprocess_image(path)
        want = torchvision_image(path)
        err = float(np.abs(got - want).max())
        print(f"preprocess_image vs torchvision [{name}] {Image.open(path).size}: "
              f"max abs err {err:.3g}")
        assert got.shape == (224, 224, 3) and got.dtype == np.float32, (got.shape, got.dtype)
        assert err <= TOL, f"{name}: max abs error {err} > tolerance {TOL}"
    # A PIL image goes through the same path as a file.
    pil = Image.open(tmp_path / "rgba.png")
    np.testing.assert_array_equal(preprocess.preprocess_image(pil),
                                  preprocess.preprocess_image(tmp_path / "rgba.png"))


def test_crop_rounding_is_torchvision_half_to_even():
    # (width, height) after resize -> offsets; the .5 cases tell round() from floor and half-up.
    assert preprocess.crop_box(297, 256, 224) == (36, 16, 260, 240)
    assert preprocess.crop_box(299, 256, 224) == (38, 16, 262, 240)
    assert preprocess.resized_size(640, 427, 256) == (383, 256)  # int(256 * 640 / 427) = 383.7 -> 383
    assert preprocess.resized_size(427, 640, 256) == (256, 383)
    with pytest.raises(ValueError, match="crop"):
        preprocess.preprocess_image(Image.fromarray(china()), resize=200, crop=224)


def test_preprocess_image_16bit_grayscale_is_rescaled(tmp_path):
    # convert("RGB") saturates 16-bit to 255; the documented rule maps 0..65535 -> 0..255 instead.
    rng = np.random.default_rng(1)
    wide = (rng.random((90, 120)) * 65535).astype(np.uint16)
    path = save(wide, tmp_path / "wide.png")
    assert Image.open(path).mode.startswith("I")
    eight = save(np.rint(wide / 257.0).astype(np.uint8), tmp_path / "eight.png")
    got, want = preprocess.preprocess_image(path, 64, 56), torchvision_image(eight, 64, 56)
    err = float(np.abs(got - want).max())
    print(f"16-bit grayscale vs torchvision on the rescaled 8-bit image: max abs err {err:.3g}")
    assert err <= TOL, f"max abs error {err} > tolerance {TOL}"


def test_preprocess_mask_matches_torchvision(tmp_path):
    rng = np.random.default_rng(2)
    for w, h in [(301, 257), (257, 340), (700, 500)]:
        blobs = np.kron(rng.random((h // 7 + 1, w // 7 + 1)) > 0.7, np.ones((7, 7), bool))[:h, :w]
        mask = np.where(blobs | (rng.random((h, w)) > 0.97), 255, 0).astype(np.uint8)
        path = save(mask, tmp_path / f"mask_{w}x{h}.png")
        got, want = preprocess.preprocess_mask(path), torchvision_mask(path)
        mismatched = int((got != want).sum())
        print(f"preprocess_mask vs torchvision NEAREST {w}x{h}: {mismatched} mismatched pixels, "
              f"{int(want.sum())} positive")
        assert got.shape == (224, 224) and got.dtype == bool
        assert mismatched == 0, f"{mismatched} pixels differ from torchvision (tolerance 0)"
    # An RGB mask with a faint non-zero channel still counts as anomalous.
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[100:120, 100:120, 2] = 1
    assert preprocess.preprocess_mask(save(rgb, tmp_path / "rgb_mask.png")).sum() == 400


def test_check_mask_matches(tmp_path):
    img = save(china()[:200, :300], tmp_path / "img.png")
    good = save(np.zeros((200, 300), np.uint8), tmp_path / "good_mask.png")
    bad = save(np.zeros((210, 300), np.uint8), tmp_path / "bad_mask.png")
    input_pipeline.check_mask_matches(img, good)
    with pytest.raises(errors.DatasetError) as e:
        input_pipeline.check_mask_matches(img, bad)
    msg = str(e.value)
    print("size mismatch error:", msg)
    assert str(img) in msg and str(bad) in msg and "300x210" in msg and "300x200" in msg


def test_bad_image_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    save(china(), tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:5000])
    for path in (corrupt, truncated, tmp_path / "missing.png"):
        with pytest.raises(errors.BadImageError) as e:
            preprocess.preprocess_image(path)
        print("bad image error:", e.value, "| reason:", e.value.reason)
        assert str(path) in str(e.value) and "Remove or replace the file" in str(e.value)
        assert "--" not in str(e.value), "library errors do not name command-line flags"
        assert e.value.path == path and e.value.reason and str(path) not in e.value.reason
        assert not e.value.skippable and isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- readers


def _tiny(path: Path, seed: int, size=(12, 10), fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, format=fmt)
    return path


def _tiny_mask(path: Path, size=(12, 10)) -> Path:
    m = np.zeros(size, np.uint8)
    m[2:5, 3:7] = 255
    return save(m, path)


def _mvtec(root: Path, category: str = "bottle") -> Path:
    cat = root / category
    for i, n in enumerate(["010", "002", "001"]):  # created out of order
        _tiny(cat / "train" / "good" / f"{n}.png", i)
    _tiny(cat / "test" / "good" / "000.png", 10)
    for t in ("scratch", "crack"):
        for n in ("001", "000"):
            _tiny(cat / "test" / t / f"{n}.png", 20)
            _tiny_mask(cat / "ground_truth" / t / f"{n}_mask.png")
    return root


def test_read_mvtec(tmp_path):
    root = _mvtec(tmp_path)
    c = datasets.read_mvtec(root, "bottle")
    assert c.name == "bottle" and c.has_masks
    assert [p.name for p in c.train] == ["001.png", "002.png", "010.png"]
    got = [(t.defect_type, t.path.name, t.label, t.mask_path and t.mask_path.name) for t in c.test]
    assert got == [("crack", "000.png", 1, "000_mask.png"), ("crack", "001.png", 1, "001_mask.png"),
                   ("good", "000.png", 0, None),
                   ("scratch", "000.png", 1, "000_mask.png"),
                   ("scratch", "001.png", 1, "001_mask.png")]
    assert all(t.mask_path.parent.name == t.defect_type for t in c.test if t.label)
    assert datasets.read_mvtec(root, "bottle") == c  # deterministic
    assert datasets.list_categories("mvtec", root) == ["bottle"]
    masks = input_pipeline.load_masks(c.test, resize=12, crop=10, num_threads=2)
    assert masks.shape == (5, 10, 10) and not masks[2].any() and masks[0].any()


def test_read_mvtec_errors(tmp_path, caplog):
    root = _mvtec(tmp_path)
    with pytest.raises(errors.DatasetError) as e:
        datasets.read_mvtec(root, "botle")
    print("unknown category:", e.value)
    msg = str(e.value)
    assert "'botle'" in msg and "['bottle']" in msg and "metal_nut" in msg

    empty = root / "cable" / "train" / "good"
    empty.mkdir(parents=True)
    with pytest.raises(errors.DatasetError) as e:
        datasets.read_mvtec(root, "cable")
    print("empty train:", e.value)
    assert str(empty) in str(e.value)

    missing = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(errors.DatasetError) as e:
        datasets.read_mvtec(root, "bottle")
    print("missing mask:", e.value)
    assert str(missing) in str(e.value)
    assert str(root / "bottle" / "test" / "crack" / "001.png") in str(e.value)

    for p in sorted((root / "bottle" / "ground_truth").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "bottle" / "ground_truth").rmdir()
    with caplog.at_level(logging.WARNING, logger="protoad_jax.datasets.folders"):
        c = datasets.read_mvtec(root, "bottle")
    assert not c.has_masks and all(t.mask_path is None for t in c.test)
    assert "pixel metrics will be null" in caplog.text and "ground_truth" in caplog.text


def test_check_mask_size_in_load_masks(tmp_path):
    root = _mvtec(tmp_path)
    _tiny_mask(root / "bottle" / "ground_truth" / "scratch" / "000_mask.png", size=(11, 10))
    with pytest.raises(errors.DatasetError, match="000_mask.png"):
        input_pipeline.load_masks(datasets.read_mvtec(root, "bottle").test, resize=12, crop=10)


def test_read_btad(tmp_path):
    root = make_btad_like(tmp_path, n_train=3, n_test_ok=2, n_test_ko=3, size=64)
    # A .png image with a .bmp mask, as in BTAD category 03's mix.
    _tiny(root / "01" / "test" / "ko" / "0100.png", 3, size=(64, 64))
    _tiny_mask(root / "01" / "ground_truth" / "ko" / "0100.bmp", size=(64, 64))
    c = datasets.read_btad(root, "01")
    assert [p.name for p in c.train] == ["0000.bmp", "0001.bmp", "0002.bmp"]
    got = [(t.defect_type, t.path.name, t.label, t.mask_path and t.mask_path.name) for t in c.test]
    assert got == [("ko", "0000.bmp", 1, "0000.png"), ("ko", "0001.bmp", 1, "0001.png"),
                   ("ko", "0002.bmp", 1, "0002.png"), ("ko", "0100.png", 1, "0100.bmp"),
                   ("ok", "0000.bmp", 0, None), ("ok", "0001.bmp", 0, None)]
    masks = input_pipeline.load_masks(c.test, resize=64, crop=64)
    assert all(masks[i].any() for i in range(4)) and not masks[4:].any()
    with pytest.raises(errors.DatasetError, match="'02' not found.*'01'.*'03'"):
        datasets.read_btad(root, "02")


def test_read_folder(tmp_path):
    root = tmp_path / "my_parts"
    for n in ("b.jpg", "a.png", "c.bmp", "notes.txt"):
        _tiny(root / "train" / n, 1, fmt="PNG")
    _tiny(root / "test" / "normal" / "x.png", 2)
    _tiny(root / "test" / "dent" / "y.png", 3)
    _tiny(root / "test" / "dent" / "z.png", 4)
    _tiny_mask(root / "ground_truth" / "dent" / "y_mask.png")
    _tiny_mask(root / "ground_truth" / "dent" / "z.png")
    c = datasets.read_folder(root)
    assert c.name == "my_parts" and c.has_masks
    assert [p.name for p in c.train] == ["a.png", "b.jpg", "c.bmp"]
    got = [(t.defect_type, t.path.name, t.label, t.mask_path and t.mask_path.name) for t in c.test]
    assert got == [("dent", "y.png", 1, "y_mask.png"), ("dent", "z.png", 1, "z.png"),
                   ("normal", "x.png", 0, None)]
    assert datasets.list_categories("folder", root) == ["my_parts"]
    (root / "ground_truth" / "dent" / "z.png").unlink()
    with pytest.raises(errors.DatasetError, match="z_mask.png"):
        datasets.read_folder(root)
    with pytest.raises(errors.DatasetError, match="nowhere.* does not exist"):
        datasets.read_folder(tmp_path / "nowhere")
    _tiny(root / "test" / "loose.png", 5)
    with pytest.raises(errors.DatasetError, match="loose.png"):
        datasets.read_folder(root)


# ----------------------------------------------------------------------------- streaming


def _stream_files(tmp: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 400)), int(rng.integers(20, 400))  # uneven decode times
        paths.append(_tiny(tmp / f"img_{i:02d}.png", 100 + i, size=(h, w)))
    return paths


def test_batched_order_padding_and_skip(tmp_path):
    paths = _stream_files(tmp_path, 11)
    want = np.stack([preprocess.preprocess_image(p, 32, 28) for p in paths])
    batches = list(input_pipeline.batched(paths, 4, resize=32, crop=28, num_threads=3, prefetch=5))
    assert [b.images.shape for b in batches] == [(4, 28, 28, 3)] * 3
    assert [b.num_valid for b in batches] == [4, 4, 3]
    assert [p for b in batches for p in b.paths] == paths
    got = np.concatenate([b.images[:b.num_valid] for b in batches])
    err = float(np.abs(got - want).max())
    print(f"batched (3 threads) vs sequential preprocess_image: max abs err {err}")
    assert err == 0.0, f"threaded batches differ from sequential decoding by {err} (tolerance 0)"
    assert not batches[-1].images[3:].any(), "padding rows must be zero"
    unpadded = list(input_pipeline.batched(paths, 4, resize=32, crop=28, num_threads=2, pad=False))
    assert unpadded[-1].images.shape == (3, 28, 28, 3)
    _, names = batches[0]  # unpacks as (images, paths)
    assert names == paths[:4]

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    mixed = paths[:5] + [corrupt] + paths[5:9] + [tmp_path / "gone.png"]
    with pytest.raises(errors.BadImageError, match="corrupt.png"):
        list(input_pipeline.batched(mixed, 4, resize=32, crop=28, num_threads=3))
    stream = input_pipeline.batched(mixed, 4, resize=32, crop=28, num_threads=3, skip_bad=True)
    batches = list(stream)
    assert [s.path for s in stream.skipped] == [corrupt, tmp_path / "gone.png"]
    assert stream.skipped[1].reason == "file does not exist", stream.skipped
    assert stream.skipped[0].reason.startswith("cannot decode"), stream.skipped
    assert [b.num_valid for b in batches] == [4, 4, 1]  # batches stay full
    assert [p for b in batches for p in b.paths] == paths[:9]
    np.testing.assert_array_equal(np.concatenate([b.images[:b.num_valid] for b in batches]),
                                  want[:9])


def test_pad_to():
    x = np.random.default_rng(4).random((3, 2, 2)).astype(np.float32)
    y = input_pipeline.pad_to(x, 5)
    assert y.shape == (5, 2, 2) and (y[:3] == x).all() and not y[3:].any()
    assert input_pipeline.pad_to(x, 3) is x
    with pytest.raises(ValueError):
        input_pipeline.pad_to(x, 2)


# ----------------------------------------------------------------------------- demo dataset


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_and_masks_are_exact(tmp_path):
    kw = {"n_train": 2, "n_test_good": 1, "n_test_bad": 4, "size": 96}
    a = _all_files(demo.make_demo_dataset(tmp_path / "a", seed=3, **kw))
    b = _all_files(demo.make_demo_dataset(tmp_path / "b", seed=3, **kw))
    c = _all_files(demo.make_demo_dataset(tmp_path / "c", seed=4, **kw))
    assert a == b, "same seed must give byte-identical files"
    assert a.keys() == c.keys() and a != c
    assert not [k for k in a if ".tmp" in k], "temporary files left behind"

    for category in demo.CATEGORIES:
        cat = datasets.read_mvtec(tmp_path / "a", category)
        assert len(cat.train) == 2 and cat.has_masks
        defects = [t for t in cat.test if t.label]
        assert len(defects) == 4 and sum(1 - t.label for t in cat.test) == 1
        for t in defects:
            index = int(t.path.stem)
            sample = demo.demo_sample(category, t.defect_type, index, seed=3, size=96)
            image = np.asarray(Image.open(t.path))
            mask = np.asarray(Image.open(t.mask_path)) > 0
            np.testing.assert_array_equal(image, sample.image)
            changed = np.any(image != sample.clean, axis=-1)
            frac = mask.mean()
            print(f"{category}/{t.defect_type}/{t.path.name}: mask {int(mask.sum())} px "
                  f"({100 * frac:.2f}%)")
            assert mask.any(), f"{t.mask_path} is empty"
            assert (mask == changed).all(), f"{t.mask_path} differs from the changed pixels"
            assert frac < 0.08, f"{t.defect_type} defect covers {100 * frac:.1f}% (too big)"
            assert set(np.unique(np.asarray(Image.open(t.mask_path)))) <= {0, 255}
        # Normal images differ from each other (per-image variation).
        imgs = [np.asarray(Image.open(p), np.int16) for p in cat.train]
        assert np.abs(imgs[0] - imgs[1]).mean() > 2
