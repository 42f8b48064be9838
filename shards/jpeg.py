"""JPEG bytes: validation at ingest (``validate_jpeg``) and decoding for training (``decode_image``).

Validation (the writer stores the source bytes, never re-encoded). ``full=False`` (``ingest --check
fast``, the default) validates the JPEG header with libjpeg-turbo (``simplejpeg.decode_jpeg_header``),
the pixel count the header declares (at most ``max_pixels``, ``ingest --max-pixels``: a few hundred
bytes can declare 60000 x 60000 pixels, which no decoder should be asked to allocate) and the marker
structure: the segments up to the first scan must be well formed and an end-of-image marker must
follow the first scan, which catches truncated files. ``full=True`` (``--check full``) also decodes
every image in strict mode (libjpeg warnings such as "Premature end of JPEG file" are errors), at 1/8
scale: every block is still entropy-decoded, which is what finds corrupt data, but the output is 64x
smaller; it still costs an entropy decode per image, so it is opt-in.

Decoding. simplejpeg (libjpeg-turbo) first, OpenCV as a fallback for what simplejpeg refuses (e.g. PNG
bytes named .jpg). The two decode at about the same speed (tests/bench/loader.py); simplejpeg stays
first because it takes the reduced scale as a minimum output size and returns RGB directly (OpenCV's
IMREAD_REDUCED_* / IMREAD_COLOR_RGB flags would also do). Grayscale and CMYK JPEGs come out RGB
(libjpeg-turbo converts Adobe CMYK; tested). When an image is at least twice the target on both sides
it is decoded at a reduced DCT scale, 1/2, 1/4 or 1/8, the largest that keeps both sides >= S (only
powers of two: libjpeg-turbo has SIMD IDCTs for them, and a 5/8 scale was slower than a full decode),
then squash-resized to (S, S) with the reference's antialiased bilinear filter (``resize_planes``).
EXIF orientation is ignored, as PIL's ``Image.open`` does. Normalisation is left to the device. Every
failure is a ``DecodeError`` (an image whose header declares more than ``MAX_PIXELS_LIMIT`` pixels is
one, before any allocation), which the loaders report as ``SampleError`` naming the shard and key.
"""
from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

#: default of ``ingest --max-pixels``: 2^28 (268 megapixels, e.g. 16384 x 16384), five times a 50-megapixel
#: camera photo, so that no photo of the five datasets is refused (VOC, COCO, CUB and NUS-WIDE images are
#: under 1 MP; OpenImages ships camera originals); a refused image is counted as corrupt, naming its size.
DEFAULT_MAX_PIXELS = 1 << 28
#: the most pixels an image may have at all (``--max-pixels`` may not exceed it): OpenCV's own limit
#: (CV_IO_MAX_IMAGE_PIXELS, 2^30), so that every image ingest accepts decodes with both decoders
MAX_PIXELS_LIMIT = 1 << 30


class CorruptImage(ValueError):
    """Image bytes that are not a decodable JPEG; the message says what is wrong."""


class DecodeError(ValueError):
    """Image bytes that neither simplejpeg nor OpenCV can decode."""


# ----------------------------------------------------------------------------------------- validation

_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


def _first_scan_offset(data: bytes) -> int:
    """Offset just past the first SOS segment header; walks the marker segments after SOI by their lengths.

    Walking (instead of searching for FFDA) skips APP segments, whose payload may hold an EXIF thumbnail
    with its own SOI/EOI markers.
    """
    pos, n = 2, len(data)
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise CorruptImage(f"malformed marker structure at byte {pos} before the first scan")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            raise CorruptImage("truncated before the first scan")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0xD8, 0xD9):
            raise CorruptImage(f"unexpected marker FF{marker:02X} before the first scan")
        if pos + 2 > n:
            raise CorruptImage("truncated before the first scan")
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            raise CorruptImage(f"segment FF{marker:02X} at byte {pos - 2} runs past the end of the file (truncated)")
        pos += length
        if marker == 0xDA:
            return pos


def too_many_pixels(width: int, height: int, limit: int) -> str | None:
    """Why an image of ``width`` x ``height`` is refused under ``limit`` pixels, or None."""
    if width * height <= limit:
        return None
    return f"the JPEG header declares {width}x{height} = {width * height:,} pixels, more than the limit of {limit:,}"


def validate_jpeg(data: bytes, *, full: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check that ``data`` is a complete JPEG and return its (width, height) from the header.

    Raises ``CorruptImage`` naming the problem. ``full=False``: header, at most ``max_pixels`` pixels,
    marker structure, an EOI marker after the first scan (a truncated file has none: inside entropy-coded
    data 0xFF is always followed by 0x00 or a restart marker). ``full=True``: additionally decode the
    whole image at 1/8 scale in strict mode, which also rejects corrupt entropy-coded data that libjpeg
    would only warn about.
    """
    if len(data) == 0:
        raise CorruptImage("empty file")
    if not data.startswith(b"\xff\xd8"):
        kind = (
            "PNG" if data.startswith(b"\x89PNG") else "GIF" if data.startswith(b"GIF8")
            else "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "unknown"
        )
        raise CorruptImage(f"not a JPEG (no SOI marker; looks like {kind} data, first bytes {data[:4].hex()})")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise CorruptImage(f"unreadable JPEG header: {e}") from None
    if width <= 0 or height <= 0:
        raise CorruptImage(f"JPEG header gives size {width}x{height}")
    too_large = too_many_pixels(width, height, max_pixels)
    if too_large:
        raise CorruptImage(f"{too_large} (--max-pixels)")
    scan = _first_scan_offset(data)
    if data.rfind(b"\xff\xd9", scan) < 0:  # rfind: the marker is normally in the last bytes
        raise CorruptImage("truncated: no end-of-image marker after the scan data")
    if full:
        # Decoding to GRAY (CMYK stays CMYK: libjpeg cannot convert it) at 1/8 scale still entropy-decodes
        # every block, which is what finds corrupt data. The scale comes from min_height/min_width: libjpeg
        # picks the smallest M/8 scale whose output is at least that (1 x 1: 1/8); min_factor alone does not
        # reduce the scale.
        try:
            simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace == "CMYK" else "GRAY", min_height=1,
                                   min_width=1, strict=True)
        except ValueError as e:
            raise CorruptImage(f"JPEG does not decode cleanly: {e}") from None
    return width, height


# ------------------------------------------------------------------------------------------- decoding

def header_problem(data: bytes) -> str | None:
    """Why no decoder may be given ``data``: a JPEG header that declares more than ``MAX_PIXELS_LIMIT`` pixels;
    None otherwise (bytes that are no readable JPEG too: the decoder reports those). For decoders that
    allocate the full image first (the DALI loader's); ``decode_rgb`` makes the same check itself."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return too_many_pixels(width, height, MAX_PIXELS_LIMIT)


def decode_scale(height: int, width: int, size: int | tuple[int, int]) -> int:
    """Largest DCT reduction in (1, 2, 4, 8) that keeps both sides >= the target (so 1 below 2x the target);
    ``size`` is S (an S x S target) or (target height, target width)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    f = 1
    while f < 8 and height >= 2 * f * out_h and width >= 2 * f * out_w:
        f *= 2
    return f


def _scaled(height: int, width: int, f: int) -> dict[str, int]:
    """simplejpeg's arguments for a 1/f decode: libjpeg-turbo picks the smallest M/8 scale whose output is
    >= the minimum; ceil(h/f) makes that exactly 1/f (scaled sizes are rounded up)."""
    return {} if f == 1 else {"min_height": -(-height // f), "min_width": -(-width // f)}


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array, at reduced scale when the image is >= 2x ``size``."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        too_large = too_many_pixels(width, height, MAX_PIXELS_LIMIT)
        if too_large:  # no decoder is asked to allocate it (ingest refuses such images; this one was altered)
            raise DecodeError(too_large)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **_scaled(height, width,
                                                                         decode_scale(height, width, size)))
    except DecodeError:
        raise
    except ValueError as e:  # not a JPEG libjpeg-turbo accepts (PNG bytes, some exotic JPEGs)
        first_error = e
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:  # e.g. its own pixel limit: a failure like any other, not a raw cv2.error
        raise DecodeError(f"simplejpeg ({first_error}) and OpenCV ({str(e).strip().splitlines()[-1]}) cannot "
                          f"decode these {len(data)} bytes") from None
    if img is None:
        raise DecodeError(f"neither simplejpeg ({first_error}) nor OpenCV can decode these {len(data)} bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_planes(img: np.ndarray, size: int | tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Squash-resize an HxWxC uint8 array to planar (C, size, size) uint8 with the reference's filter
    (``size`` may also be (height, width): ``ingest --max-side`` keeps the aspect ratio); into ``out``, a
    C-contiguous (C, size, size) uint8 array, when given (the CPU loader's shared-memory slot: no copy).

    The reference code resizes PIL images (``transforms.Resize``: PIL's antialiased bilinear filter, a
    triangle whose support grows with the reduction). This is the same filter: torch's uint8
    ``interpolate(mode="bilinear", antialias=True)``, which torchvision's ``Resize(antialias=True)``
    calls on tensors and which rounds as PIL does. ``cv2.INTER_LINEAR`` (no antialiasing) aliases at
    reductions >= 1.5 and ``cv2.INTER_AREA`` (a box) is farther from the reference and slower
    (tests/test_loader.py measures the distance, the README's benchmark table the cost). Upscaling is
    plain bilinear, as in PIL.
    """
    # torch is imported here, not at the top: ingest validates JPEGs with this module without torch
    import torch
    import torch.nn.functional as F

    # An NCHW view of the HWC array (channels-last strides) takes torch's vectorised uint8 kernel without
    # a copy (a planar copy first cost twice as much); its output is planar, which is what the loaders
    # feed the model.
    t = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    if out is not None:  # the aten operator F.interpolate calls, in its out= form (F.interpolate has none)
        torch.ops.aten._upsample_bilinear2d_aa.out(t, list(out_size), False, None, None,
                                                   out=torch.from_numpy(out).unsqueeze(0))
        return out
    return F.interpolate(t, size=out_size, mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode and squash-resize to (size, size, 3) uint8 RGB (aspect ratio not kept, as in the paper)."""
    img = decode_rgb(data, size)
    if img.shape[:2] != (size, size):
        img = cv2.merge(list(resize_planes(img, size)))  # interleaved 15x faster than numpy's transposing copy
    return img


# ------------------------------------------------------------------------------ bounded size (ingest)

#: default of ``ingest --quality``: the JPEG quality of images re-encoded by ``--max-side``
DEFAULT_QUALITY = 90
#: chroma subsampling of re-encoded images: 4:4:4 (full-resolution colour). After the reduction the
#: source's own 4:2:0 chroma is finer than the new image's pixels; 4:2:0 again would halve it a second
#: time, below what the reference (full decode, then resize) sees at the training size (README: the
#: bounded-size rows measure both the distance to the reference and the decode cost of each choice).
REENCODE_SUBSAMPLING = "444"


def bounded_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """(width, height) of an image re-encoded to longer side ``max_side`` (the shorter side scaled alike,
    rounded half up, at least 1), or None when its longer side is at most ``max_side`` (kept as it is)."""
    if max(width, height) <= max_side:
        return None
    if width >= height:
        return max_side, max(1, (2 * height * max_side + width) // (2 * width))
    return max(1, (2 * width * max_side + height) // (2 * height)), max_side


def reencode_bounded(data: bytes, max_side: int, quality: int = DEFAULT_QUALITY) -> tuple[bytes, int, int] | None:
    """``data`` re-encoded with its longer side reduced to ``max_side`` as (bytes, width, height), or None when
    it is no larger (its bytes are then stored unchanged).

    The pixels go through the loaders' path: a reduced DCT scale while the image stays >= 2x the new size,
    then the antialiased bilinear filter (``resize_planes``), then libjpeg-turbo at ``quality`` with 4:4:4
    chroma (``REENCODE_SUBSAMPLING``). A grayscale JPEG stays grayscale (one channel); every other one
    (YCbCr, Adobe CMYK/YCCK: libjpeg-turbo converts them) is stored as RGB-in-YCbCr. Metadata segments
    (EXIF, ICC profiles) are not carried over; EXIF orientation is ignored by the loaders either way.
    ``data`` must have passed ``validate_jpeg`` (its pixel limit is checked on the source); an image that
    does not decode even leniently is a ``DecodeError``.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise DecodeError(f"unreadable JPEG header: {e}") from None
    target = bounded_size(width, height, max_side)
    if target is None:
        return None
    out_w, out_h = target
    gray = colorspace == "Gray"
    try:
        # not strict: data libjpeg only warns about decodes as it does in the loaders (whose OpenCV fallback
        # is lenient too); ``--check full`` refuses such images before they get here
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", strict=False,
                                     **_scaled(height, width, decode_scale(height, width, (out_h, out_w))))
    except ValueError as e:
        raise DecodeError(f"cannot be decoded to re-encode it (--max-side): {e}") from None
    pixels = np.ascontiguousarray(resize_planes(img, (out_h, out_w)).transpose(1, 2, 0))
    encoded = simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="GRAY" if gray else "RGB",
                                     colorsubsampling="Gray" if gray else REENCODE_SUBSAMPLING)
    return encoded, out_w, out_h
