"""Run each script in examples/ in its quick mode, in a subprocess, and check what it claims to show."""
import re
import struct
import zlib

import pytest

from support import run_example


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in the output:\n{text}"
    return float(match.group(1))


def read_png(path):
    """(width, height, rgb rows) of an 8-bit RGB PNG, checking the signature, every chunk's CRC and the data size."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0), "expected 8-bit RGB, not interlaced"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[r * stride] == 0 for r in range(height)), "the example writes filter type 0 on every row"
    return width, height, [raw[r * stride + 1:(r + 1) * stride] for r in range(height)]


def test_integrated_gradients_example(tmp_path):
    scale = 3
    out = run_example("integrated_gradients.py", "--quick", "--scale", str(scale), "--out", "ig.png", cwd=tmp_path)
    width, height, rows = read_png(tmp_path / "ig.png")
    assert (width, height) == ((2 * 28 + 1) * scale, 28 * scale)
    # The right part is the heat map (red positive, white zero, the bright square's box outlined in green): its
    # reddest pixel lies inside the green box.
    heat = [[tuple(row[j:j + 3]) for j in range(3 * 29 * scale, len(row), 3)] for row in rows]
    green = [(r, c) for r, line in enumerate(heat) for c, px in enumerate(line) if px == (0, 160, 0)]
    assert green, "no box drawn on the heat map"
    (top, left), (bottom, right) = min(green), max(green)
    redness, r, c = max((255 - px[1], r, c) for r, line in enumerate(heat) for c, px in enumerate(line)
                        if px[0] == 255 and px[1] == px[2])
    assert redness > 100 and top <= r <= bottom and left <= c <= right, (redness, r, c, top, left, bottom, right)
    relative = number(r"completeness error: \S+ \(relative (\S+)\)", out)
    assert relative < 0.05, out
    # The attribution falls on the bright square, far above the box's share of the image and above the decoy's.
    inside = number(r"mean over \d+ images: bright square (\d+)%", out)
    decoy = number(r"mean over \d+ images: .*decoy (\d+)%", out)
    area = number(r"boxes' mean area (\d+)%", out)
    assert inside > 3 * area and inside > decoy, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_attention_lm_example(tmp_path, seed):
    out = run_example("linear_attention_lm.py", "--quick", "--seed", str(seed), "--chars", "120", cwd=tmp_path)
    before = number(r"held-out loss before training: (\S+) bits/char", out)
    after = number(r"held-out loss after training: (\S+) bits/char", out)
    assert after < before - 1.0, out
    err = number(r"decode check: max \|step logits - forward logits\| = (\S+)", out)
    assert err < 1e-3, out
    sample = out.split("-" * 60 + "\n")[1]  # the prompt and the generated text, between two rules
    prompt = "    def __init__(self"
    assert sample.startswith(prompt) and len(sample) > len(prompt) + 60, out
