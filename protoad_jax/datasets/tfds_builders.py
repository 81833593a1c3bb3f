"""TensorFlow Datasets builders for MVTec AD and BTAD (manual download), and a loader that gives
the folder readers' images, in their order, from a prepared dataset.

Optional extra: ``pip install "protoad-jax[tfds]"`` (tensorflow-datasets; TensorFlow itself is not
needed). Importing this module registers two builders:

  ``mvtec_ad/<category>`` (15 configs: bottle ... zipper) and ``btad/<01|02|03>``.

Features: ``image`` (uint8 PNG, ``[h, w, 3]``, or ``[h, w, 1]`` for the grayscale MVTec
categories grid, screw and zipper), ``mask`` (uint8 PNG ``[h, w, 1]``, 255 on anomalous pixels,
all zero for normal images), ``label`` (normal / anomalous), ``defect_type`` (the test folder:
``good``/``ok`` for normal images) and ``file_name`` (the path inside the category folder,
e.g. ``test/crack/000.png``). Splits: ``train`` (normal images only) and ``test``.

Parity with the folder readers is by construction: the builders list files with
``folders.read_mvtec`` / ``folders.read_btad`` (same files, same order, same mask pairing), keep that
order (integer keys, shuffling disabled), and store the pixels the reader decodes before resizing,
losslessly: an 8-bit PNG already in the stored mode is kept byte for byte, anything else (BMP,
palette, alpha, 16-bit) is decoded and converted exactly as ``preprocess.preprocess_image`` does, then
PNG-encoded. A grayscale category keeps one channel, checked equal to the other two, so converting
it back to RGB gives the reader's pixels. Masks are stored binarised (``> 0`` in any channel), which
is all ``preprocess.preprocess_mask`` keeps: NEAREST resizing picks pixels, so binarising first is the
same.

Data are written as ``array_record`` (random access through ``tfds.data_source`` /
``builder.as_data_source()``, no TensorFlow needed). ``tf.data`` users pass
``file_format="tfrecord"`` to the builder and need TensorFlow.

Manual download: put the original archives, or the extracted folders, in the manual folder
(default ``<data_dir>/downloads/manual``). Archives are extracted once under
``<data_dir>/downloads/extracted/`` and shared by all configs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, NamedTuple

import numpy as np
from PIL import Image

from protoad_jax import errors, fileio, input_pipeline, preprocess
from protoad_jax.datasets import folders

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("protoad_jax.tfds_builders needs tensorflow-datasets; install the optional "
                      "extra: pip install 'protoad-jax[tfds]'") from e

log = logging.getLogger(__name__)

MVTEC_GRAYSCALE = ("grid", "screw", "zipper")
MVTEC_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
BTAD_ARCHIVES = ("BTAD.zip", "btad.zip")
LABEL_NAMES = ("normal", "anomalous")
# Searched below the manual folder (and below an extracted archive) for <root>/<category>/train.
_SEARCH_DEPTH = 2
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- builders


@dataclasses.dataclass(eq=False)
class AnomalyConfig(tfds.core.BuilderConfig):
    """One category; ``channels`` is 3, or 1 for a grayscale category (stored single-channel)."""

    channels: int = 3


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared code: locate the category in the manual folder, list it with the folder reader, and
    write its files in the reader's order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: original pixels, reader order, binarised masks."}
    DATASET = ""  # "mvtec" or "btad": which protoad_jax.datasets.folders reader lists the files
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        # TFDS defaults to tfrecord, which needs TensorFlow to write and read. A freshly built
        # dataset defaults to array_record instead; one prepared earlier keeps its own format.
        if file_format is None and not self.info.initialized:
            self.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        channels = self.builder_config.channels
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, channels), dtype=np.uint8,
                                             encoding_format="png"),
                "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                            encoding_format="png"),
                "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                "defect_type": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            disable_shuffling=True,  # the folder reader's order, so results match the folder path
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    # Subclasses: which archives may hold the category, and what to tell the user.
    def _archives(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _expected(self) -> str:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        name = self.builder_config.name
        root = find_category_root(Path(dl_manager.manual_dir), name, self._archives(),
                                  Path(dl_manager.download_dir) / "extracted", self._expected())
        cat = folders.read_dataset(self.DATASET, root, name)
        cat_dir = root / name
        if not cat.has_masks:
            raise errors.DatasetError(
                f"{self.name}/{name}: {cat_dir / 'ground_truth'} does not exist; the builder "
                f"needs the ground-truth masks. {self._expected()}")
        train_type = cat.train[0].parent.name  # good (MVTec) / ok (BTAD)
        train = [folders.TestItem(p, train_type, 0, None) for p in cat.train]
        channels = self.builder_config.channels
        return {"train": self._generate_examples(cat_dir, train, channels),
                "test": self._generate_examples(cat_dir, cat.test, channels)}

    def _generate_examples(self, cat_dir: Path, items: list[folders.TestItem],
                           channels: int) -> Iterator[tuple[int, dict[str, Any]]]:
        def encode(item: folders.TestItem) -> dict[str, Any]:
            image, size = encode_image(item.path, channels)
            if item.label:
                input_pipeline.check_mask_matches(item.path, item.mask_path)
                mask = encode_mask(item.mask_path)
            else:
                mask = _png(np.zeros(size[::-1], np.uint8))
            return {"image": image, "mask": mask, "label": item.label,
                    "defect_type": item.defect_type,
                    "file_name": item.path.relative_to(cat_dir).as_posix()}

        # Integer keys in reader order (shuffling is disabled): the split keeps this order.
        yield from enumerate(input_pipeline.ordered_map(encode, items, n := input_pipeline.default_num_threads(), 4 * n))


def _citation(key: str, body: str) -> str:
    return f"@inproceedings{{{key},\n{body}\n}}"


class MvtecAd(_AnomalyBuilder):
    """MVTec AD (Bergmann et al., CVPR 2019): 15 categories of industrial images."""

    DATASET = "mvtec"
    BUILDER_CONFIGS: ClassVar[list[AnomalyConfig]] = [
        AnomalyConfig(name=c, description=f"MVTec AD category {c}",
                      channels=1 if c in MVTEC_GRAYSCALE else 3)
        for c in folders.MVTEC_CATEGORIES]
    DESCRIPTION = ("MVTec AD: defect-free training images and test images with pixel-precise "
                   "ground truth, 15 object and texture categories.")
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    CITATION = _citation("bergmann2019mvtec", (
        "  title = {MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly "
        "Detection},\n  author = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and "
        "Steger, Carsten},\n  booktitle = {CVPR},\n  year = {2019}"))
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download MVTec AD from {HOMEPAGE} (registration required; CC BY-NC-SA 4.0) and put in the
    manual folder either the whole archive {MVTEC_ARCHIVE}, a per-category archive such as
    bottle.tar.xz, or the extracted folders (<manual_dir>/bottle/train/good/..., possibly one
    level down, e.g. <manual_dir>/mvtec_anomaly_detection/bottle/...).
    """

    def _archives(self) -> tuple[str, ...]:
        return (f"{self.builder_config.name}.tar.xz", MVTEC_ARCHIVE)

    def _expected(self) -> str:
        c = self.builder_config.name
        return (f"Expected the MVTec AD layout {c}/train/good/*.png, {c}/test/<type>/*.png, "
                f"{c}/ground_truth/<type>/<name>_mask.png (extracted, or in {c}.tar.xz or "
                f"{MVTEC_ARCHIVE}).")


class Btad(_AnomalyBuilder):
    """BTAD, the beanTech anomaly detection dataset (Mishra et al., ISIE 2021): 3 products."""

    DATASET = "btad"
    BUILDER_CONFIGS: ClassVar[list[AnomalyConfig]] = [
        AnomalyConfig(name=c, description=f"BTAD product {c}") for c in folders.BTAD_CATEGORIES]
    DESCRIPTION = ("BTAD (beanTech Anomaly Detection): three industrial products, defect-free "
                   "training images, test images with ground-truth masks.")
    HOMEPAGE = "https://github.com/pankajmishra000/VT-ADL"
    CITATION = _citation("mishra2021vtadl", (
        "  title = {VT-ADL: A Vision Transformer Network for Image Anomaly Detection and "
        "Localization},\n  author = {Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and "
        "Piciarelli, Claudio and Foresti, Gian Luca},\n  booktitle = {ISIE},\n  year = {2021}"))
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download btad.zip (see the VT-ADL repository for the link) and put in the manual folder
    either the archive (BTAD.zip or btad.zip, holding BTech_Dataset_transformed/01/...) or the
    extracted folders (<manual_dir>/BTech_Dataset_transformed/01/train/ok/..., or
    <manual_dir>/01/train/ok/...).
    """

    def _archives(self) -> tuple[str, ...]:
        return BTAD_ARCHIVES

    def _expected(self) -> str:
        c = self.builder_config.name
        return (f"Expected the BTAD layout {c}/train/ok/*, {c}/test/ok/*, {c}/test/ko/*, "
                f"{c}/ground_truth/ko/<name>.png|.bmp (extracted, e.g. under "
                f"BTech_Dataset_transformed/, or in {' or '.join(BTAD_ARCHIVES)}).")


BUILDERS: dict[str, type[_AnomalyBuilder]] = {"mvtec_ad": MvtecAd, "btad": Btad}


# ----------------------------------------------------------------------------- manual folder


def _roots(folder: Path, depth: int) -> Iterator[Path]:
    """``folder`` and its non-hidden subfolders down to ``depth`` levels, breadth first, sorted."""
    level = [folder]
    for d in range(depth + 1):
        yield from level
        if d < depth:
            level = [c for p in level for c in sorted(p.iterdir(), key=lambda c: c.name)
                     if c.is_dir() and not c.name.startswith(".")]


def _find_root(folder: Path, category: str) -> Path | None:
    return next((r for r in _roots(folder, _SEARCH_DEPTH) if (r / category / "train").is_dir()),
                None)


def find_category_root(manual_dir: Path, category: str, archives: Sequence[str],
                       extract_dir: Path, expected: str) -> Path:
    """The folder holding ``<category>/train``: found under ``manual_dir`` (up to two levels
    down), else in the first of ``archives`` present there (matched case-insensitively), which is
    extracted once to ``extract_dir/<archive name>``.

    Raises:
      DatasetError: neither is there, or the archive lacks the category; the message lists what
        was looked for and what the folder holds.
    """
    root = _find_root(manual_dir, category)
    if root is not None:
        return root
    present = {p.name.lower(): p for p in manual_dir.iterdir() if p.is_file()}
    for name in archives:
        archive = present.get(name.lower())
        if archive is None:
            continue
        out = extract_archive(archive, extract_dir / archive.name)
        root = _find_root(out, category)
        if root is None:
            raise errors.DatasetError(f"archive {archive} has no {category}/train folder (extracted "
                                    f"to {out}). {expected}")
        return root
    found = sorted(p.name for p in manual_dir.iterdir())
    raise errors.DatasetError(
        f"no {category}/train folder under {manual_dir} (searched {_SEARCH_DEPTH} levels down) and "
        f"none of the archives {', '.join(archives)} there; it holds: {found[:20] or 'nothing'}. "
        f"{expected}")


def _member_path(name: str, archive: Path) -> PurePosixPath | None:
    """The safe relative path of an archive member, or None for entries to skip (``.``, hidden
    files such as macOS ``._`` resource forks). Raises on paths that leave the folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise errors.DatasetError(f"archive {archive} has an unsafe member path {name!r} (absolute "
                                "or with '..'); refusing to extract it")
    parts = [p for p in path.parts if p != "."]
    if not parts or any(p.startswith(".") for p in parts) or parts[0] == "__MACOSX":
        return None
    return PurePosixPath(*parts)


def _iter_members(archive: Path) -> Iterator[tuple[PurePosixPath, Any]]:
    """``(relative path, file object)`` for the regular files of a tar (any compression) or zip
    archive, in archive order; links, devices and folders are skipped."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                path = _member_path(info.filename, archive)
                if path is not None and not info.is_dir():
                    with z.open(info) as f:
                        yield path, f
        return
    try:
        with tarfile.open(archive, "r|*") as tar:  # stream mode: one pass over the (xz) stream
            for member in tar:
                path = _member_path(member.name, archive)
                if path is not None and member.isfile():
                    yield path, tar.extractfile(member)
    except tarfile.TarError as e:
        raise errors.DatasetError(f"cannot read archive {archive}: {e}") from e


def extract_archive(archive: Path, out: Path) -> Path:
    """Extracts the regular files of ``archive`` (tar, tar.gz/xz/bz2, zip) to ``out`` and returns
    it; an existing ``out`` is reused. Writes to a temporary sibling folder renamed at the end, so
    ``out`` exists only when complete.

    Raises:
      DatasetError: the archive is unreadable or has members with absolute or ``..`` paths.
    """
    if out.is_dir():
        return out
    log.info("extracting %s to %s", archive, out)

    def extract(tmp: Path) -> None:
        count = 0
        for path, f in _iter_members(archive):
            dst = tmp.joinpath(*path.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
            count += 1
        if not count:
            raise errors.DatasetError(f"archive {archive} holds no files")

    try:
        return fileio.atomic_write_dir(out, extract)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise errors.DatasetError(f"cannot extract archive {archive}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- encoding


def _png(array: np.ndarray) -> bytes:
    # zlib level 1: lossless like any level, faster to write than PIL's default 6, a little larger.
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _is_plain_png(raw: bytes, channels: int) -> bool:
    """An 8-bit PNG of colour type gray (1 channel) or RGB (3 channels): decoders agree on it and
    it decodes to exactly the pixels ``preprocess.preprocess_image`` starts from."""
    # IHDR is the first chunk: signature (8), length (4), b"IHDR", width, height, depth, colour.
    return (raw[:8] == _PNG_SIGNATURE and raw[12:16] == b"IHDR" and raw[24] == 8
            and raw[25] == (0 if channels == 1 else 2))


def encode_image(path: Path, channels: int) -> tuple[bytes, tuple[int, int]]:
    """The PNG bytes stored for an image file and its ``(width, height)``.

    The stored pixels are those ``preprocess.preprocess_image`` computes before resizing (the image
    converted to RGB); with ``channels == 1`` their first channel, after checking that all three
    are equal.

    Raises:
      BadImageError: the file cannot be decoded.
      DatasetError: a grayscale category holds a colour image.
    """
    img = preprocess.open_image(path)  # the reader's decoder (PIL, fully loaded, errors name the file)
    if img.format == "PNG" and "transparency" not in img.info:
        raw = path.read_bytes()
        if _is_plain_png(raw, channels):
            return raw, img.size  # the original file, byte for byte
    rgb = np.asarray(preprocess.to_rgb(img))  # exactly the reader's conversion
    if channels == 3:
        return _png(rgb), img.size
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
        raise errors.DatasetError(f"{path} is a colour image ({img.mode}) but its category is stored "
                                "as grayscale (one channel); expected a grayscale image")
    return _png(rgb[..., 0]), img.size


def encode_mask(path: Path) -> bytes:
    """PNG bytes of a mask file binarised like ``preprocess.preprocess_mask``: 255 where any channel is
    non-zero, else 0, ``[h, w]``.

    Raises:
      BadImageError: the file cannot be decoded.
    """
    m = preprocess.binarize_mask(preprocess.mask_image(path))
    return _png(m.astype(np.uint8) * np.uint8(255))


# ----------------------------------------------------------------------------- loading


class Example(NamedTuple):
    """One prepared example. ``image`` ``[h, w, c]`` uint8 as stored (``c`` is 3, or 1 for a
    grayscale category); ``mask`` ``[h, w]`` bool (all False for normal images); ``label`` 0
    normal, 1 anomalous; ``file_name`` the path inside the category folder."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    defect_type: str
    file_name: str


def _decode_png(raw: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(raw)) as im:
        a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _decode_record(r: dict[str, Any]) -> Example:
    mask = _decode_png(r["mask"])[..., 0] > 0
    return Example(_decode_png(r["image"]), mask, int(r["label"]), _text(r["defect_type"]),
                   _text(r["file_name"]))


class Split(Sequence[Example]):
    """A prepared split in the folder reader's order; ``split[i]`` decodes example ``i`` (PNG via
    PIL, the reader's decoder). Reads records from the calling thread only."""

    def __init__(self, source: Sequence[dict[str, Any]]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, i: int) -> dict[str, Any]:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:  # Sequence iteration stops on IndexError; the source raises ValueError
            raise IndexError(f"index {i} out of range for a split of {n} examples")
        return self._source[j]

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _decode_record(self._record(i))

    def items(self) -> list[folders.TestItem]:
        """``folders.TestItem(Path(file_name), defect_type, label, None)`` per example, in order; only
        the small fields are read (no image decoding)."""
        out = []
        for i in range(len(self)):
            r = self._record(i)
            out.append(folders.TestItem(Path(_text(r["file_name"])), _text(r["defect_type"]),
                                     int(r["label"]), None))
        return out


class TfdsCategory(NamedTuple):
    """A prepared category: ``name`` (``"mvtec_ad/bottle"``), its ``train`` and ``test`` splits,
    and the builder (for ``info``, ``data_dir``)."""

    name: str
    train: Split
    test: Split
    builder: Any


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"tfds:mvtec_ad/bottle"`` (the ``tfds:`` prefix is optional) -> ``("mvtec_ad", "bottle")``;
    ``"tfds:btad"`` -> ``("btad", None)``.

    Raises:
      ValueError: unknown builder or config; the message lists the known ones.
    """
    name, _, config = spec.removeprefix("tfds:").partition("/")
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS dataset {name!r} in {spec!r}; expected one of "
                         f"{sorted(BUILDERS)} (e.g. tfds:mvtec_ad/bottle, tfds:btad/01)")
    if config and config not in list_configs(name):
        raise ValueError(f"unknown config {config!r} of {name} in {spec!r}; expected one of "
                         f"{list_configs(name)}")
    return name, config or None


def list_configs(name: str) -> list[str]:
    """The config (category) names of builder ``name`` (``"mvtec_ad"`` or ``"btad"``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS dataset {name!r}; expected one of {sorted(BUILDERS)}")
    return [c.name for c in BUILDERS[name].BUILDER_CONFIGS]


def make_builder(spec: str, data_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> _AnomalyBuilder:
    """The builder of ``spec`` (``"tfds:mvtec_ad/bottle"``, ``"btad/01"``) under ``data_dir``
    (default: TFDS's, ``~/tensorflow_datasets``)."""
    name, config = parse_spec(spec)
    if config is None:
        raise ValueError(f"{spec!r} names no category; expected e.g. tfds:{name}/"
                         f"{list_configs(name)[0]}")
    return BUILDERS[name](config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                          **kwargs)


def load_category(spec: str, data_dir: str | os.PathLike | None = None, *,
                  manual_dir: str | os.PathLike | None = None,
                  prepare: bool = True) -> TfdsCategory:
    """Opens a prepared category, preparing it first (from ``manual_dir``, default
    ``<data_dir>/downloads/manual``) when it is not and ``prepare`` is set.

    Args:
      spec: ``"tfds:mvtec_ad/<category>"`` or ``"tfds:btad/<01|02|03>"`` (prefix optional).
      data_dir: TFDS data folder.
      manual_dir: where the archives or extracted folders are.
      prepare: build the dataset when it is not prepared yet.

    Returns:
      ``TfdsCategory`` whose splits yield the folder reader's files in the reader's order.

    Raises:
      ValueError: unknown dataset or category.
      FileNotFoundError: not prepared and ``prepare=False``.
      DatasetError / AssertionError (TFDS: empty or missing manual folder): preparing failed; the
        message says what was expected.
    """
    builder = make_builder(spec, data_dir)
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(f"{builder.name}/{builder.builder_config.name} is not prepared "
                                    f"under {builder.data_dir}; prepare it first (prepare=True)")
        config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir))
        builder.download_and_prepare(download_config=config)
    skip = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
    sources = builder.as_data_source(decoders=skip)
    return TfdsCategory(f"{builder.name}/{builder.builder_config.name}", Split(sources["train"]),
                        Split(sources["test"]), builder)


# ----------------------------------------------------------------------------- preprocessing


def image_to_pil(image: np.ndarray) -> Image.Image:
    """A stored ``[h, w, 3]`` or ``[h, w, 1]`` uint8 image as a PIL image (RGB or L)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected a [h, w, 3] or [h, w, 1] uint8 image, got {a.shape} {a.dtype}")
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def preprocess_example_image(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """``preprocess.preprocess_image`` of a stored image: ``[crop, crop, 3]`` float32, bit-identical to
    ``preprocess.preprocess_image`` on the original file."""
    return preprocess.preprocess_image(image_to_pil(image), resize, crop)


def preprocess_example_mask(mask: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """``preprocess.preprocess_mask`` of a stored ``[h, w]`` bool mask: NEAREST resize (shorter side),
    center crop, ``[crop, crop]`` bool; equal to ``preprocess.preprocess_mask`` on the original file."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a [h, w] mask, got shape {m.shape}")
    return preprocess.preprocess_mask(Image.fromarray((m != 0).astype(np.uint8) * np.uint8(255)),
                                resize, crop)


def preprocess_split(split: Split, resize: int = 256, crop: int = 224,
                     num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All images and masks of a split, preprocessed, in order. Records are read on the calling
    thread; PNG decoding and resizing run on a thread pool.

    Returns:
      ``images`` ``[n, crop, crop, 3]`` float32 and ``masks`` ``[n, crop, crop]`` bool, each row
      bit-identical to ``preprocess.preprocess_image`` / ``preprocess.preprocess_mask`` on the original files.
    """
    if not isinstance(split, Split):
        raise TypeError(f"expected a Split from load_category, got {type(split).__name__}")
    n = len(split)
    images = np.empty((n, crop, crop, 3), np.float32)
    masks = np.empty((n, crop, crop), bool)

    def one(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        ex = _decode_record(record)
        return (preprocess_example_image(ex.image, resize, crop),
                preprocess_example_mask(ex.mask, resize, crop))

    threads = max(1, input_pipeline.default_num_threads() if num_threads is None else num_threads)
    records = (split._record(i) for i in range(n))
    for i, (x, m) in enumerate(input_pipeline.ordered_map(one, records, threads, 4 * threads)):
        images[i], masks[i] = x, m
    return images, masks
