"""An image's width and height read from its file header, before anything is decoded.

:func:`image_size` knows every format this project's OpenCV decodes (PNG, JPEG, BMP, GIF, TIFF and BigTIFF, WebP,
PBM/PGM/PPM/PAM, PFM, Sun raster, Radiance HDR, JPEG 2000 (JP2 and raw codestream), AVIF), so that
``fastig.io.images`` can refuse an image too large to decode while it is still a few bytes. The numbers are those
the decoders allocate for: the frame header of a JPEG (not an EXIF thumbnail's), the first TIFF page, a WebP's
canvas, a GIF's logical screen, the largest ``ispe`` of an AVIF. A header that is cut short or malformed gives None,
as does a format that is not listed.
"""

from __future__ import annotations

import re
import struct


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of the image file ``data``, or None when it is not a header read here."""
    for magic, reader in _READERS:
        if data.startswith(magic):
            try:
                return reader(data)
            except (struct.error, IndexError, ValueError):
                return None
    return None


def _png(data):
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


# SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC): the frame headers that carry the image size
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data):
    pos = 2
    while True:
        if data[pos] != 0xFF:
            return None
        while data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        if length < 2:
            return None
        pos += length  # segments (EXIF with its thumbnail, ICC profiles, ...) are skipped whole


def _bmp(data):
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # a negative height is a top-down bitmap


def _gif(data):
    return struct.unpack("<HH", data[6:10])


def _tiff(data):
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43  # BigTIFF
    if big:
        (offset,) = struct.unpack(order + "Q", data[8:16])
        count_format, entry_size, value_formats = "Q", 20, {3: "H", 4: "I", 16: "Q"}
    else:
        (offset,) = struct.unpack(order + "I", data[4:8])
        count_format, entry_size, value_formats = "H", 12, {3: "H", 4: "I"}
    count_size = struct.calcsize(count_format)
    (entries,) = struct.unpack(order + count_format, data[offset:offset + count_size])
    found = {}
    for i in range(entries):
        entry = offset + count_size + i * entry_size
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257) and kind in value_formats:  # ImageWidth, ImageLength
            value_at = entry + (12 if big else 8)
            fmt = order + value_formats[kind]
            found[tag] = struct.unpack(fmt, data[value_at:value_at + struct.calcsize(fmt)])[0]
    if 256 not in found or 257 not in found:
        return None
    return found[256], found[257]


def _webp(data):
    if data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: after a 3-byte frame tag and the start code 9d 01 2a, 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature 0x2f, then width-1 and height-1 in 14 bits each
        if data[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24-bit width-1 and height-1
        if len(data) < 30:
            return None
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n?)*(\S+)")


def _netpbm(data):
    """P1-P6 and PF/Pf: the magic, then width and height as text (netpbm allows comments between tokens)."""
    tokens, pos = [], 2
    while len(tokens) < 2:
        match = _TOKEN.match(data, pos)
        if match is None:
            return None
        tokens.append(int(match.group(1)))
        pos = match.end()
    return tokens[0], tokens[1]


def _pam(data):
    header = data[:data.find(b"ENDHDR")] if b"ENDHDR" in data else None
    if header is None:
        return None
    fields = dict(re.findall(rb"^(WIDTH|HEIGHT)\s+(\d+)", header, re.M))
    return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])


def _sun_raster(data):
    return struct.unpack(">II", data[4:12])


def _radiance(data):
    """Header lines, a blank line, then the resolution line: ``-Y 480 +X 640`` (rows first) or ``+X 640 -Y 480``."""
    end = data.find(b"\n\n")
    if end < 0:
        return None
    line = data[end + 2:data.find(b"\n", end + 2)]
    match = re.fullmatch(rb"([-+])([XY]) (\d+) ([-+])([XY]) (\d+)\s*", line)
    if match is None or match.group(2) == match.group(5):
        return None
    first, second = int(match.group(3)), int(match.group(6))
    return (second, first) if match.group(2) == b"Y" else (first, second)


def _j2k(data):
    """JPEG 2000 codestream: the SIZ segment right after SOC: Xsiz, Ysiz minus the image offsets."""
    width, height, x0, y0 = struct.unpack(">IIII", data[8:24])
    return width - x0, height - y0


def _boxes(data, start, end):
    """The ISO base media boxes (JP2, AVIF) in data[start:end]: (type, payload start, payload end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8:pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise ValueError("bad box size")
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _jp2(data):
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for inner, s, _ in _boxes(data, start, end):
                if inner == b"ihdr":
                    height, width = struct.unpack(">II", data[s:s + 8])
                    return width, height
    return None


def _avif(data):
    """The largest image spatial extent (``ispe``) among the item properties: meta > iprp > ipco > ispe."""
    (ftyp_size,) = struct.unpack(">I", data[:4])
    brands = data[8:12] + data[16:ftyp_size]  # the major brand, then the compatible ones
    if data[4:8] != b"ftyp" or not {brands[i:i + 4] for i in range(0, len(brands), 4)} & {b"avif", b"avis"}:
        return None
    sizes = []
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"meta":
            for iprp, s1, e1 in _boxes(data, start + 4, end):  # meta is a full box: 4 bytes of version/flags
                if iprp == b"iprp":
                    for ipco, s2, e2 in _boxes(data, s1, e1):
                        if ipco == b"ipco":
                            sizes += [struct.unpack(">II", data[s + 4:s + 12]) for k, s, _ in _boxes(data, s2, e2)
                                      if k == b"ispe"]
    return max(sizes, key=lambda wh: wh[0] * wh[1]) if sizes else None


_READERS = [
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"BM", _bmp),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
    (b"II+\x00", _tiff),
    (b"MM\x00+", _tiff),
    (b"RIFF", _webp),
    *((b"P%d" % k, _netpbm) for k in range(1, 7)),
    (b"PF", _netpbm),
    (b"Pf", _netpbm),
    (b"P7", _pam),
    (b"\x59\xa6\x6a\x95", _sun_raster),
    (b"#?RADIANCE", _radiance),
    (b"#?RGBE", _radiance),
    (b"\xff\x4f\xff\x51", _j2k),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", _jp2),
    (b"\x00\x00\x00", _avif),  # an ISO base media file starts with its ftyp box's 32-bit size
]
