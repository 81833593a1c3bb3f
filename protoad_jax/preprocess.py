"""Decoding and preprocessing of images and masks, equal to the reference's torchvision pipeline.

docs/METHOD.md section 1: ``Image.open(p).convert("RGB")`` -> ``Resize(256, LANCZOS)`` ->
``CenterCrop(224)`` -> ``ToTensor`` -> ``Normalize(ImageNet)``, returned HWC as numpy float32
(``[crop, crop, 3]``). Masks follow docs/METHOD.md section 3: NEAREST resize, same crop, ``> 0``.
The other views (docs/METHOD.md section 5): ``preprocess_frame`` (whole image), ``preprocess_tiles``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from protoad_jax import views
from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD
from protoad_jax.errors import BadImageError, DatasetError, SettingsError

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)
# 16-bit grayscale modes. convert("RGB") saturates them to 255 (the reference would see a white
# image), so they are rescaled 0..65535 -> 0..255 instead; 8-bit images are untouched.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Output ``(width, height)`` of torchvision ``Resize(resize)``: shorter side -> ``resize``.

    Transcribes ``torchvision.transforms.functional._compute_resized_output_size``: the long side
    is ``int(resize * long / short)`` (truncation, not rounding); a square stays square.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of torchvision ``CenterCrop(crop)`` on a ``width x height``
    image.

    torchvision uses ``int(round((size - crop) / 2.0))``: Python's round-half-to-even, so an offset
    of 36.5 gives 36 and 37.5 gives 38.
    """
    if crop > width or crop > height:
        raise SettingsError(f"center crop {crop} is larger than the resized image {width}x{height}")
    top = round((height - crop) / 2.0)  # Python 3 round() returns an int
    left = round((width - crop) / 2.0)
    return left, top, left + crop, top + crop


def check_sizes(resize: int, crop: int) -> None:
    if not (isinstance(resize, int) and isinstance(crop, int) and 0 < crop <= resize):
        raise SettingsError(
            f"expected integers 0 < crop <= resize, got resize={resize!r}, crop={crop!r}")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes ``path`` (PIL, any mode); any failure is a ``BadImageError`` that
    names the file."""
    try:
        # Exiting the block closes the file only; the decoded image stays usable.
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        reason = "file does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors. PIL's messages may
        # quote the path, which the error names anyway.
        detail = str(e).replace(repr(str(path)), "").replace(str(path), "").strip(" :")
        reason = f"cannot decode ({type(e).__name__}: {detail})" if detail else \
            f"cannot decode ({type(e).__name__})"
    raise BadImageError(f"image file {path}: {reason}. Remove or replace the file.", path, reason)


def to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image ``preprocess_image`` starts from: like ``img.convert("RGB")`` (grayscale,
    palette, RGBA -> RGB; alpha is dropped), but 16-bit grayscale is rescaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path_or_pil: str | os.PathLike | Image.Image) -> Image.Image:
    """``to_rgb`` of a PIL image, or of a file decoded with ``open_image``."""
    return to_rgb(path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil))


def preprocess_image(path_or_pil: str | os.PathLike | Image.Image, resize: int = 256,
                     crop: int = 224) -> np.ndarray:
    """Decodes, resizes, center-crops and normalises one image exactly like the reference.

    Args:
      path_or_pil: an image file or a PIL image (any mode; converted to RGB).
      resize: shorter side after PIL ``LANCZOS`` resize (torchvision ``Resize(int)`` semantics).
      crop: side of the center crop (torchvision ``CenterCrop`` rounding).

    Returns:
      ``[crop, crop, 3]`` float32, ``(x / 255 - mean) / std`` with ImageNet mean/std, HWC.

    Raises:
      BadImageError: the file is missing or cannot be decoded (the message names it).
      SettingsError: ``crop > resize``.
    """
    check_sizes(resize, crop)
    img = open_rgb(path_or_pil)
    size = resized_size(*img.size, resize)
    if size != img.size:  # torchvision returns the image untouched when the size already matches
        img = img.resize(size, Image.LANCZOS)
    return normalize(img.crop(crop_box(*img.size, crop)))


def normalize(img: Image.Image) -> np.ndarray:
    """An RGB image as ``[h, w, 3]`` float32: ``ToTensor`` then ``Normalize(ImageNet)``, in
    float32 as torch does them (``x / 255``, ``(x - mean) / std``), HWC."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - _MEAN) / _STD


def preprocess_original(path_or_pil: str | os.PathLike | Image.Image) -> np.ndarray:
    """The whole image at its original resolution, ``[height, width, 3]`` float32 normalised like
    ``preprocess_image`` (the frame views' overlays)."""
    return normalize(open_rgb(path_or_pil))


def preprocess_frame(path_or_pil: str | os.PathLike | Image.Image, size: int = 224) -> np.ndarray:
    """The ``full_frame`` view (docs/METHOD.md section 5): the whole image resized to
    ``size x size`` with PIL ``LANCZOS`` (the reference's resize filter; the aspect ratio is not
    kept, nothing is cropped), normalised like ``preprocess_image``.

    Returns:
      ``[size, size, 3]`` float32.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    img = open_rgb(path_or_pil)
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    return normalize(img)


def preprocess_tiles(path_or_pil: str | os.PathLike | Image.Image, size: int, tile_size: int,
                     tile_overlap: int, tile_image_size: int | None
                     ) -> tuple[np.ndarray, views.TileLayout]:
    """The ``tiles`` view (docs/METHOD.md section 5): the image (long side first resized to
    ``tile_image_size`` with PIL ``LANCZOS`` when set) cut into ``views.tile_layout``'s tiles,
    each resized to ``size x size`` with ``LANCZOS`` and normalised like ``preprocess_image``.

    Returns:
      ``(tiles [num_tiles, size, size, 3] float32 in layout.boxes order, layout)``.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
      views.TileError: a tile is larger than the (resized) image.
    """
    img = open_rgb(path_or_pil)
    what = "image" if isinstance(path_or_pil, Image.Image) else f"image file {path_or_pil}"
    layout = views.tile_layout(*img.size, tile_size, tile_overlap, tile_image_size, what)
    if img.size != (layout.tiled_width, layout.tiled_height):
        img = img.resize((layout.tiled_width, layout.tiled_height), Image.LANCZOS)
    tiles = []
    for box in layout.boxes:
        tile = img.crop(box)
        tiles.append(normalize(tile if tile_size == size else tile.resize((size, size), Image.LANCZOS)))
    return np.stack(tiles), layout


def mask_image(path_or_pil: str | os.PathLike | Image.Image) -> Image.Image:
    """A ground-truth mask file (or PIL image) in a mode where ``> 0`` means "not black": palette
    and alpha modes become colour (``LA`` becomes ``L``), other modes are kept.

    NEAREST resizing picks pixels without mixing them, so binarising (``binarize_mask``) after a
    resize equals binarising before it.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    if not isinstance(path_or_pil, Image.Image) and os.path.isdir(path_or_pil):
        return _union_mask(path_or_pil)
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    if img.mode in ("1", "L", "RGB", "F") or img.mode in _WIDE_MODES:
        return img
    return img.convert("L") if img.mode == "LA" else img.convert("RGB")


def mask_files(path: str | os.PathLike) -> list[Path]:
    """A mask file as ``[path]``, or a folder's mask files sorted by name: MVTec LOCO keeps one
    file per defect of a test image (``ground_truth/<type>/<stem>/000.png, 001.png, ...``), and
    the image's mask is their union (``mask_image`` of the folder).

    Raises:
      DatasetError: the folder holds no mask files.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MASK_SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: p.name)
    if not found:
        raise DatasetError(f"mask folder {path} holds no mask files ({', '.join(MASK_SUFFIXES)}); "
                           "restore them from the downloaded archive")
    return found


def _union_mask(folder: str | os.PathLike) -> Image.Image:
    """The union of a folder's masks (any non-zero pixel of any file) as an ``L`` image, 255 = defect."""
    files = mask_files(folder)
    masks = [binarize_mask(mask_image(f)) for f in files]
    for f, m in zip(files[1:], masks[1:]):
        if m.shape != masks[0].shape:
            raise DatasetError(f"mask {f} is {m.shape[1]}x{m.shape[0]} but {files[0]} in the same "
                               f"folder is {masks[0].shape[1]}x{masks[0].shape[0]} (width x height); "
                               "the masks of one image must have its size")
    return Image.fromarray(np.logical_or.reduce(masks).astype(np.uint8) * 255)


def binarize_mask(img: Image.Image) -> np.ndarray:
    """``[h, w]`` bool of a ``mask_image``: a pixel is anomalous when any channel is non-zero."""
    m = np.asarray(img) > 0
    return m.any(axis=-1) if m.ndim == 3 else m


def preprocess_mask(path_or_pil: str | os.PathLike | Image.Image, resize: int = 256,
                    crop: int = 224) -> np.ndarray:
    """Loads a ground-truth mask: PIL NEAREST resize (shorter side), center crop, ``> 0``.

    Args:
      path_or_pil: a mask file or a PIL image (original image size).

    Returns:
      ``[crop, crop]`` bool; a pixel is anomalous when any channel is non-zero.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    check_sizes(resize, crop)
    img = mask_image(path_or_pil)
    size = resized_size(*img.size, resize)
    if size != img.size:
        img = img.resize(size, Image.NEAREST)
    return binarize_mask(img.crop(crop_box(*img.size, crop)))


def preprocess_frame_mask(path_or_pil: str | os.PathLike | Image.Image, size: int = 224) -> np.ndarray:
    """A ground-truth mask for the ``full_frame`` and ``tiles`` views: the whole mask resized to
    ``size x size`` with PIL NEAREST (no crop; the evaluation resolution, docs/METHOD.md
    section 5), ``> 0``.

    Returns:
      ``[size, size]`` bool.
    """
    img = mask_image(path_or_pil)
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return binarize_mask(img)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise BadImageError(f"image file {path} does not exist", path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot read the header of image file {path} ({e})", path,
                            f"cannot read the header ({type(e).__name__})") from e

