"""examples/cant_stop.py in its quick mode: plain greedy and top-k decoding leave the group-B prompts unfinished,
consistent sampling ends more of them, the self-terminating head ends every sequence under every decoder."""
import re

from support import run_example

ROW = re.compile(r"^(plain|self-terminating)\s+(.+?)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%")


def test_cant_stop_quick(tmp_path):
    out = run_example("cant_stop.py", "--quick", cwd=tmp_path)
    shares = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            shares[(m.group(1), m.group(2))] = float(m.group(3))
    greedy, topk, consistent = "greedy", "top-k=2 sampling", "top-k=2 + eos (consistent)"
    assert set(shares) == {(m, d) for m in ("plain", "self-terminating") for d in (greedy, topk, consistent)}, out
    assert shares[("plain", greedy)] < 100.0, out
    assert shares[("plain", topk)] < 100.0, out
    assert shares[("plain", consistent)] > shares[("plain", topk)], out
    for d in (greedy, topk, consistent):
        assert shares[("self-terminating", d)] == 100.0, out
