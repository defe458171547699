"""A PNG writer from the standard library alone, shared by the examples that draw images (not an example itself)."""
import struct
import zlib


def write_png(path, rgb):
    """Write rgb, a list of rows, each a bytes object of 3 * width values, as an 8-bit RGB PNG."""
    height, width = len(rgb), len(rgb[0]) // 3

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row) for row in rgb)  # filter type 0 (none) on every row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))
