"""Decoding and preprocessing of images and masks, equal to the reference's torchvision pipeline.

docs/METHOD.md section 1: ``Image.open(p).convert("RGB")`` -> ``Resize(256, LANCZOS)`` ->
``CenterCrop(224)`` -> ``ToTensor`` -> ``Normalize(ImageNet)``, returned HWC as numpy float32
(``[crop, crop, 3]``). Masks follow docs/METHOD.md section 3: NEAREST resize, same crop, ``> 0``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from protoad_jax.config import IMAGENET_MEAN, IMAGENET_STD
from protoad_jax.errors import BadImageError, SettingsError

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)
# 16-bit grayscale modes. convert("RGB") saturates them to 255 (the reference would see a white
# image), so they are rescaled 0..65535 -> 0..255 instead; 8-bit images are untouched.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


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
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    img = to_rgb(img)
    size = resized_size(*img.size, resize)
    if size != img.size:  # torchvision returns the image untouched when the size already matches
        img = img.resize(size, Image.LANCZOS)
    img = img.crop(crop_box(*img.size, crop))
    # ToTensor then Normalize, all in float32 as torch does them: x / 255, (x - mean) / std.
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - _MEAN) / _STD


def mask_image(path_or_pil: str | os.PathLike | Image.Image) -> Image.Image:
    """A ground-truth mask file (or PIL image) in a mode where ``> 0`` means "not black": palette
    and alpha modes become colour (``LA`` becomes ``L``), other modes are kept.

    NEAREST resizing picks pixels without mixing them, so binarising (``binarize_mask``) after a
    resize equals binarising before it.

    Raises:
      BadImageError: the file is missing or cannot be decoded.
    """
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    if img.mode in ("1", "L", "RGB", "F") or img.mode in _WIDE_MODES:
        return img
    return img.convert("L") if img.mode == "LA" else img.convert("RGB")


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

