"""Run the training-objective examples (examples/vae.py, examples/regularizers.py) in their quick modes, in a
subprocess with one thread, and check what they claim to show."""
import re

from support import run_example


def test_vae_example(tmp_path):
    out = run_example("vae.py", "--quick", cwd=tmp_path)
    epochs = re.findall(r"^epoch +(\d+) +KL weight ([\d.]+) +train ELBO +(-?[\d.]+) +held-out ELBO +(-?[\d.]+)", out,
                        re.M)
    assert len(epochs) == 4, out
    weights = [float(e[1]) for e in epochs]
    assert weights[0] < 1.0 and weights[-1] == 1.0 and weights == sorted(weights), out  # the warm-up ramps to 1
    start = float(re.search(r"before training: held-out ELBO +(-?[\d.]+)", out).group(1))
    held_out = [float(e[3]) for e in epochs]
    # the bound rises well above the untrained model's (about -44 nats on these images) as the model learns
    assert held_out[-1] > start + 10 and held_out[-1] > held_out[0], out


def test_regularizers_example(tmp_path):
    out = run_example("regularizers.py", "--quick", cwd=tmp_path)
    rel = float(re.search(r"relative difference ([\d.e+-]+)", out).group(1))
    assert rel < 1e-3, out
    acc = {m: float(a) for m, a in re.findall(r"^(plain|noise|penalty|VAT) +held-out accuracy ([\d.]+)", out, re.M)}
    assert set(acc) == {"plain", "noise", "penalty", "VAT"}, out
    # the regularizers that use the unlabelled points beat the labels-only model by a clear margin
    assert acc["VAT"] > acc["plain"] + 0.1 and acc["noise"] > acc["plain"] + 0.1, out
