"""TFDS builders (mvtec_ad, btad) against the folder readers: same files, same order, same pixels.

The oracle is the folder path itself: ``datasets.read_mvtec`` / ``datasets.read_btad`` for the file list
and pairing, ``preprocess.preprocess_image`` / ``preprocess.preprocess_mask`` on the original files for the
arrays the pipeline sees (bit for bit), and plain PIL ``convert("RGB")`` for the stored pixels.
The generated folders mix the formats real data may hold: plain 8-bit PNGs (kept byte for byte),
BMP, palette, RGBA, RGB with a transparent colour, 16-bit grayscale, non-square images, and masks
in modes 1, L (values other than 255) and RGB.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from layouts import make_btad_like

from protoad_jax import datasets, preprocess, weights
from protoad_jax.datasets import demo
from protoad_jax.datasets import tfds_builders as tb

tfds.disable_progress_bar()
RESIZE, CROP = 256, 224


# ----------------------------------------------------------------------------- generated data


def _save(array: np.ndarray, path: Path, fmt: str = "PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)  # uint16 [h, w] -> mode I;16


def _demo_rgb(i: int, size: int = 64) -> np.ndarray:
    return demo.demo_sample(demo.TEXTURE, "train", 100 + i, seed=3, size=size).image


def make_mvtec(root: Path, category: str, grayscale: bool) -> Path:
    """A tiny MVTec-layout category ``root/<category>`` from the demo texture, plus odd formats."""
    tmp = root / f".tmp_{category}"
    demo.make_demo_dataset(tmp, seed=1, n_train=4, n_test_good=2, n_test_bad=4, size=64,
                           categories=(demo.TEXTURE,))
    cat = root / category
    shutil.move(tmp / demo.TEXTURE, cat)
    shutil.rmtree(tmp)
    rng = np.random.default_rng(7)
    train, good = cat / "train" / "good", cat / "test" / "good"
    if grayscale:  # like grid/screw/zipper: 8-bit L PNGs, plus gray images in other encodings
        for p in sorted(cat.rglob("*.png")):
            if "ground_truth" not in p.parts:
                Image.open(p).convert("L").save(p)
        gray = np.asarray(Image.fromarray(_demo_rgb(0)).convert("L"))
        _save(np.repeat(gray[..., None], 3, -1), train / "010.png")  # RGB PNG with R == G == B
        _save(gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape).astype(np.uint16),
              good / "010.png")  # 16-bit: the reader rescales, not saturates
        Image.fromarray(gray).convert("P").save(train / "011.png")  # gray palette
        _save(np.asarray(Image.fromarray(_demo_rgb(1)).convert("L")), train / "012.bmp", "BMP")
    else:
        _save(_demo_rgb(0), train / "010.bmp", "BMP")
        Image.fromarray(_demo_rgb(1)).quantize(64).save(train / "011.png")  # palette
        rgba = np.concatenate([_demo_rgb(2), rng.integers(0, 256, (64, 64, 1), np.uint8)], -1)
        _save(rgba, train / "012.png")
        _save(_demo_rgb(3), train / "013.png", transparency=(10, 20, 30))  # RGB + tRNS chunk
        _save(np.asarray(Image.fromarray(_demo_rgb(4)).convert("L")), good / "010.png")
        wide = rng.integers(0, 65536, (50, 64), dtype=np.uint16)
        _save(wide, good / "011.png")
    # A non-square anomalous image whose masks come in other modes and values.
    img = rng.integers(0, 256, (48, 64, 3), np.uint8)
    _save(img if not grayscale else img[..., 0], cat / "test" / "crack" / "000.png")
    _save(img if not grayscale else img[..., 0], cat / "test" / "crack" / "001.png")
    m = np.zeros((48, 64), np.uint8)
    m[5:30, 7:40] = rng.integers(0, 3, (25, 33))  # values 0, 1, 2: "> 0" is what counts
    _save(m, cat / "ground_truth" / "crack" / "000_mask.png")
    rgb_mask = np.zeros((48, 64, 3), np.uint8)
    rgb_mask[20:40, 30:60, 2] = 200  # only the blue channel set
    _save(rgb_mask, cat / "ground_truth" / "crack" / "001_mask.png")
    bad = min((cat / "ground_truth" / "hole").glob("*_mask.png"))
    Image.open(bad).convert("1").save(bad)  # a 1-bit mask
    return cat


def make_btad(root: Path) -> Path:
    """A tiny BTAD-layout product ``root/01`` (BMP images, PNG and BMP masks)."""
    make_btad_like(root, seed=2, n_train=5, n_test_ok=2, n_test_ko=4, size=64)
    gt = root / "01" / "ground_truth" / "ko"
    first = min(gt.glob("*.png"))
    Image.open(first).save(first.with_suffix(".bmp"))
    first.unlink()
    return root / "01"


def _tar(archive: Path, folders: dict[str, Path]) -> Path:
    with tarfile.open(archive, "w:xz") as t:
        for arcname, folder in folders.items():
            t.add(folder, arcname)
    return archive


# ----------------------------------------------------------------------------- checks


def assert_matches_reader(cat: tb.TfdsCategory, ref: datasets.Category, channels: int) -> None:
    """Every example equals the folder reader's file, in the reader's order, bit for bit."""
    cat_dir = ref.train[0].parents[2]
    ref_splits = {"train": [datasets.TestItem(p, p.parent.name, 0, None) for p in ref.train],
                  "test": ref.test}
    raw_tfds = cat.builder.as_data_source()  # TFDS's own decoding (OpenCV or PIL)
    max_err = 0.0
    for name, split in (("train", cat.train), ("test", cat.test)):
        items = ref_splits[name]
        names = [it.path.relative_to(cat_dir).as_posix() for it in items]
        assert [it.path.as_posix() for it in split.items()] == names, f"{name}: order differs"
        images, masks = tb.preprocess_split(split, RESIZE, CROP, num_threads=2)
        for i, (ex, it) in enumerate(zip(split, items, strict=True)):
            where = f"{name}[{i}] {ex.file_name}"
            assert (ex.file_name, ex.label, ex.defect_type) == (names[i], it.label, it.defect_type)
            # Stored pixels: the reader's RGB (one channel of it for a grayscale category).
            want_rgb = np.asarray(preprocess.to_rgb(preprocess.open_image(it.path)))
            assert ex.image.dtype == np.uint8 and ex.image.shape == want_rgb.shape[:2] + (channels,)
            plain = Image.open(it.path)
            if plain.mode not in preprocess._WIDE_MODES:  # independent oracle: PIL's own conversion
                assert np.array_equal(want_rgb, np.asarray(plain.convert("RGB"))), where
            assert np.array_equal(np.broadcast_to(ex.image, want_rgb.shape), want_rgb), where
            # What the pipeline sees.
            want = preprocess.preprocess_image(it.path, RESIZE, CROP)
            got = tb.preprocess_example_image(ex.image, RESIZE, CROP)
            max_err = max(max_err, float(np.abs(got - want).max()),
                          float(np.abs(images[i] - want).max()))
            assert np.array_equal(got, want) and np.array_equal(images[i], want), where
            want_m = (preprocess.preprocess_mask(it.mask_path, RESIZE, CROP) if it.label
                      else np.zeros((CROP, CROP), bool))
            assert want_m.any() == bool(it.label), where  # the check can see a lost mask
            assert np.array_equal(tb.preprocess_example_mask(ex.mask), want_m), where
            assert np.array_equal(masks[i], want_m), where
            if it.label:
                full = np.asarray(preprocess.mask_image(it.mask_path)) > 0
                assert np.array_equal(ex.mask, full.any(-1) if full.ndim == 3 else full), where
            else:
                assert ex.mask.shape == want_rgb.shape[:2] and not ex.mask.any(), where
            # Anyone reading with TFDS's decoder gets the same pixels.
            r = raw_tfds[name][i]
            assert np.array_equal(r["image"], ex.image), f"{where}: TFDS decoding differs"
            assert np.array_equal(r["mask"][..., 0] > 0, ex.mask), where
            assert set(np.unique(r["mask"])) <= {0, 255}, where
    print(f"{cat.name}: {len(cat.train)} train, {len(cat.test)} test; max |tfds - folder| "
          f"after preprocessing = {max_err} (tolerance 0: bit-identical)")
    assert max_err == 0.0


def _data_dir(tmp: Path) -> Path:
    return tmp / "tfds"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("category,channels", [("bottle", 3), ("grid", 1)])
def test_mvtec_from_folder_matches_reader(tmp_path, category, channels):
    manual = tmp_path / "manual" / "mvtec_anomaly_detection"  # one level down is found
    make_mvtec(manual, category, grayscale=channels == 1)
    cat = tb.load_category(f"tfds:mvtec_ad/{category}", _data_dir(tmp_path),
                           manual_dir=tmp_path / "manual")
    assert cat.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert cat.builder.info.features["image"].shape == (None, None, channels)
    ref = datasets.read_mvtec(manual, category)
    assert len(cat.train) == len(ref.train) >= 7 and len(cat.test) == len(ref.test) >= 8
    assert_matches_reader(cat, ref, channels)
    # A plain 8-bit PNG in the stored mode is kept byte for byte.
    raw = cat.builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    assert raw[0]["image"] == ref.train[0].read_bytes()
    # Prepared data are reused: no manual folder needed any more.
    shutil.rmtree(tmp_path / "manual")
    again = tb.load_category(f"mvtec_ad/{category}", _data_dir(tmp_path), prepare=False)
    assert [e.file_name for e in again.test] == [e.file_name for e in cat.test]


def test_btad_from_zip_matches_reader(tmp_path):
    folder = tmp_path / "src" / "BTech_Dataset_transformed"
    make_btad(folder)
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "BTAD.zip", "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent).as_posix())
    cat = tb.load_category("tfds:btad/01", _data_dir(tmp_path), manual_dir=manual)
    extracted = _data_dir(tmp_path) / "downloads" / "extracted" / "BTAD.zip"
    assert (extracted / "BTech_Dataset_transformed" / "01" / "train" / "ok").is_dir()
    ref = datasets.read_btad(folder, "01")
    assert {it.mask_path.suffix for it in ref.test if it.label} == {".png", ".bmp"}
    assert ref.train[0].suffix == ".bmp"
    assert_matches_reader(cat, ref, 3)


def test_mvtec_from_archives(tmp_path):
    src = tmp_path / "src"
    make_mvtec(src, "bottle", grayscale=False)
    make_mvtec(src, "grid", grayscale=True)
    manual = tmp_path / "manual"
    manual.mkdir()
    _tar(manual / tb.MVTEC_ARCHIVE, {"bottle": src / "bottle", "grid": src / "grid"})
    data_dir = _data_dir(tmp_path)
    cat = tb.load_category("mvtec_ad/bottle", data_dir, manual_dir=manual)
    assert_matches_reader(cat, datasets.read_mvtec(src, "bottle"), 3)
    # The second config reuses the extraction of the shared archive.
    extracted = data_dir / "downloads" / "extracted" / tb.MVTEC_ARCHIVE
    marker = extracted / "marker"
    marker.write_text("kept")
    cat = tb.load_category("mvtec_ad/grid", data_dir, manual_dir=manual)
    assert marker.exists(), "the archive was extracted a second time"
    assert_matches_reader(cat, datasets.read_mvtec(src, "grid"), 1)
    # A per-category archive is preferred to the full one.
    manual2 = tmp_path / "manual2"
    manual2.mkdir()
    _tar(manual2 / "bottle.tar.xz", {"bottle": src / "bottle"})
    cat = tb.load_category("mvtec_ad/bottle", tmp_path / "tfds2", manual_dir=manual2)
    assert_matches_reader(cat, datasets.read_mvtec(src, "bottle"), 3)


def _build_error(tmp_path: Path, spec: str, manual: Path) -> str:
    with pytest.raises(Exception) as e:
        tb.load_category(spec, _data_dir(tmp_path), manual_dir=manual)
    return str(e.value)


def test_missing_files_say_what_was_expected(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "notes.txt").write_text("not a dataset")
    msg = _build_error(tmp_path, "mvtec_ad/bottle", manual)
    print(msg)
    for part in ("bottle/train", "bottle.tar.xz", tb.MVTEC_ARCHIVE, "notes.txt",
                 "ground_truth/<type>/<name>_mask.png"):
        assert part in msg, f"{part!r} missing from the error: {msg}"
    msg = _build_error(tmp_path, "btad/02", manual)
    for part in ("02/train", "BTAD.zip", "btad.zip", "02/train/ok", "02/ground_truth/ko"):
        assert part in msg, f"{part!r} missing from the error: {msg}"
    # No manual folder at all: TFDS's message, with our instructions.
    msg = _build_error(tmp_path, "mvtec_ad/bottle", tmp_path / "absent")
    assert "does not exist or is empty" in msg and tb.MVTEC_ARCHIVE in msg, msg
    # An archive without the category.
    src = tmp_path / "src"
    make_mvtec(src, "grid", grayscale=True)
    _tar(manual / tb.MVTEC_ARCHIVE, {"grid": src / "grid"})
    msg = _build_error(tmp_path, "mvtec_ad/bottle", manual)
    assert f"{tb.MVTEC_ARCHIVE} has no bottle/train folder" in msg, msg


def test_bad_layouts_fail_clearly(tmp_path):
    manual = tmp_path / "manual"
    cat = make_mvtec(manual, "bottle", grayscale=False)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    msg = _build_error(tmp_path, "mvtec_ad/bottle", manual)
    assert "no ground-truth mask" in msg and "001_mask.png" in msg, msg
    shutil.rmtree(cat / "ground_truth")
    msg = _build_error(tmp_path, "mvtec_ad/bottle", manual)
    assert "ground_truth does not exist" in msg, msg

    manual = tmp_path / "manual2"
    cat = make_mvtec(manual, "zipper", grayscale=True)
    _save(_demo_rgb(5), cat / "train" / "good" / "099.png")  # colour in a grayscale category
    msg = _build_error(tmp_path, "mvtec_ad/zipper", manual)
    assert "099.png is a colour image" in msg, msg

    manual = tmp_path / "manual3"
    cat = make_mvtec(manual, "tile", grayscale=False)
    _save(np.zeros((10, 10), np.uint8), cat / "ground_truth" / "crack" / "000_mask.png")
    msg = _build_error(tmp_path, "mvtec_ad/tile", manual)
    assert "000_mask.png is 10x10" in msg, msg


def test_unsafe_archive_is_refused(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / tb.MVTEC_ARCHIVE, "w:xz") as t:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    msg = _build_error(tmp_path, "mvtec_ad/bottle", manual)
    assert "unsafe member path '../evil.txt'" in msg, msg
    assert not (tmp_path / "tfds" / "downloads" / "evil.txt").exists()
    assert not list((tmp_path / "tfds" / "downloads" / "extracted").iterdir())


def test_specs_and_configs():
    assert tb.parse_spec("tfds:mvtec_ad/bottle") == ("mvtec_ad", "bottle")
    assert tb.parse_spec("btad/01") == ("btad", "01")
    assert tb.parse_spec("tfds:btad") == ("btad", None)
    assert tb.list_configs("mvtec_ad") == list(datasets.MVTEC_CATEGORIES)
    assert tb.list_configs("btad") == ["01", "02", "03"]
    gray = [c.name for c in tb.MvtecAd.BUILDER_CONFIGS if c.channels == 1]
    assert gray == ["grid", "screw", "zipper"]
    with pytest.raises(ValueError, match="expected one of"):
        tb.parse_spec("tfds:mvtec/bottle")
    with pytest.raises(ValueError, match="unknown config 'bottel'"):
        tb.parse_spec("tfds:mvtec_ad/bottel")
    with pytest.raises(ValueError, match="names no category"):
        tb.make_builder("tfds:btad")
    # Registered with TFDS under these names.
    assert {"mvtec_ad", "btad"} <= set(tfds.list_builders(with_community_datasets=False))


def test_not_prepared_without_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        tb.load_category("tfds:btad/03", tmp_path, prepare=False)


def test_preprocess_helpers_check_inputs():
    with pytest.raises(ValueError, match="uint8 image"):
        tb.image_to_pil(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[h, w\] mask"):
        tb.preprocess_example_mask(np.zeros((4, 4, 1), bool))


def test_evaluate_through_tfds_equals_folder(tmp_path):
    """The same category through TFDS and through the folder reader gives identical numbers."""
    from protoad_jax import Config, evaluation

    manual = tmp_path / "manual"
    make_mvtec(manual, "bottle", grayscale=False)
    net = weights.random_backbone("wide_resnet50_2", "test")
    cfg = Config(resize=128, image_size=112, num_prototypes=30)
    kw = {"batch_size": 4, "num_overlays": 1, "progress": False}
    folder = evaluation.run_category("mvtec", manual, "bottle", tmp_path / "o_folder", cfg, net, **kw)
    via_tfds = evaluation.run_category("tfds:mvtec_ad", None, "bottle", tmp_path / "o_tfds", cfg, net,
                                       tfds_data_dir=str(_data_dir(tmp_path)), tfds_manual_dir=str(manual),
                                       **kw)
    for key in evaluation.METRICS + ("num_prototypes", "num_train", "num_test"):
        print(key, folder[key], via_tfds[key])
        assert folder[key] == via_tfds[key], key
    column = evaluation.SCORES_COLUMNS.index("score")
    scores = [np.loadtxt(d / "bottle" / "scores.csv", delimiter=",", skiprows=1, usecols=column)
              for d in (tmp_path / "o_folder", tmp_path / "o_tfds")]
    assert np.array_equal(scores[0], scores[1])
    protos = [np.load(d / "bottle" / "model.npz")["prototypes"] for d in (tmp_path / "o_folder", tmp_path / "o_tfds")]
    assert np.array_equal(protos[0], protos[1])
