"""The user's image files for ``launch/predict.py``: which files the inputs name, and each
one decoded as it is shown.

The inputs are files, folders (their image files, sorted by name; not recursive) and glob
patterns (expanded here too, for patterns the shell left quoted). An image is decoded with PIL,
its EXIF orientation applied, and converted to 8-bit RGB whatever its mode (grey, 16-bit,
palette, transparent). A file that cannot be read is an OSError with a one-line reason.
"""

from __future__ import annotations

import glob
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

# What a folder contributes; a file named explicitly is tried whatever its name.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)  # fmt: skip
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _is_pattern(text: str) -> bool:
    return glob.escape(text) != text  # escaping changes only *, ? and [


def _folder_images(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS's "._IMG_1.jpg" companions are not images.
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[dict]]:
    """The image files ``inputs`` name, in order, each once; and ``{"file", "reason"}`` for
    the inputs that name none (a missing path, an empty folder, a pattern matching nothing).
    A glob match is taken as if given by hand: a file is tried, a folder expanded."""
    files: list[Path] = []
    failed: list[dict] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                reason = "a folder with no image file (.jpg, .png, .tif, .webp, ...)"
                failed.append({"file": text, "reason": reason})
            for image in found:
                add(image)
        elif path.exists() or not _is_pattern(text):
            add(path)  # a missing file fails when read, in its place among the images
        else:
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                failed.append({"file": text, "reason": "no file matches this pattern"})
            for match in matches:
                match_path = Path(match)
                for image in _folder_images(match_path) if match_path.is_dir() else [match_path]:
                    add(image)
    return files, failed


def _to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of any PIL mode."""
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        # convert("RGB") clips 16-bit grey at 255, which whitens the image: scale instead.
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max(initial=0))
        top = 65535.0 if image.mode in _SIXTEEN_BIT_MODES or peak > 255 else 255.0
        top = 1.0 if image.mode == "F" and peak <= 1 else top
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if "A" in image.getbands() or "transparency" in image.info:
        # Transparent pixels keep whatever colour they hide (often black): show them on white,
        # as an image viewer does.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"))  # a copy: torch wants a writable array


def read_image(path: Path) -> Tensor:
    """The image as shown (EXIF orientation applied), uint8 [3, H, W] RGB. Raises OSError
    with a one-line reason when the file cannot be read as an image."""
    try:
        with Image.open(path) as opened:
            opened.load()  # decodes now: a truncated file fails here, not later
            shown = ImageOps.exif_transpose(opened)
            array = _to_rgb(shown)
    except FileNotFoundError:
        raise OSError("no such file") from None
    except IsADirectoryError:
        raise OSError("a folder, not an image file") from None
    except PermissionError:
        raise OSError("permission denied") from None
    except UnidentifiedImageError:
        raise OSError("not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as error:
        raise OSError(f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's decoders raise all three
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"damaged or truncated image ({first[:160]})") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def read_ahead(
    paths: Sequence[Path], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[tuple[Path, Tensor | None, str | None]]:
    """(path, image, None) or (path, None, reason) in order, decoding up to ``ahead`` images
    in ``pool`` while the model works: a bounded window, so that a folder of ten thousand
    photos does not sit decoded in memory."""

    def read(path: Path):
        try:
            return path, read_image(path), None
        except OSError as error:
            return path, None, str(error)

    remaining = iter(paths)
    pending: deque[Future] = deque(pool.submit(read, p) for p in islice(remaining, ahead))
    while pending:
        done = pending.popleft().result()
        following = next(remaining, None)
        if following is not None:
            pending.append(pool.submit(read, following))
        yield done
