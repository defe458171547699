"""Benchmark suite set-up: `--device`, the machine's measured peaks, and the tables printed at the end."""
import fnmatch
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import Results, cpu_sgemm_peak_gflops, cuda_peaks  # noqa: E402

RESULTS = Results()


def pytest_collect_file(file_path, parent):
    """Collects bench_*.py here (pytest.ini's python_files lists test_*.py only, so a bare `pytest` skips them).
    pytest itself collects a file named on the command line, or one its python_files already match."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return parent.session.gethookproxy(file_path).pytest_pycollect_makemodule(module_path=file_path, parent=parent)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="run the suite on this device")


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--device")
    RESULTS.device = dev
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device=cuda needs a CUDA device")
    return dev


@pytest.fixture(scope="session", autouse=True)
def peaks(device):
    """Measures this machine's peaks (CPU sgemm GFLOP/s; on CUDA bf16 matmul TFLOP/s and copy GB/s) into the
    results; the session measures them again at its end and the tables use the best readings."""
    if device == "cuda":
        import torch

        tflops, gbps = cuda_peaks()
        RESULTS.machine["device"] = torch.cuda.get_device_name()
        RESULTS.record_peak("bf16 matmul TFLOP/s", tflops)
        RESULTS.record_peak("copy GB/s", gbps)
        return
    import torch

    RESULTS.machine["device"] = f"CPU, {torch.get_num_threads()} threads"
    RESULTS.record_peak("sgemm peak GFLOP/s", cpu_sgemm_peak_gflops())


@pytest.fixture(scope="session")
def results():
    return RESULTS


def pytest_sessionfinish(session, exitstatus):
    # The second reading of the peaks (the tables use the best of the two); the tables are saved whatever happens.
    try:
        if "sgemm peak GFLOP/s" in RESULTS.machine:
            RESULTS.record_peak("sgemm peak GFLOP/s", cpu_sgemm_peak_gflops())
        if "copy GB/s" in RESULTS.machine:
            tflops, gbps = cuda_peaks()
            RESULTS.record_peak("bf16 matmul TFLOP/s", tflops)
            RESULTS.record_peak("copy GB/s", gbps)
    except Exception as exc:  # e.g. a CUDA context lost to a failed benchmark
        RESULTS.machine["second peak reading"] = f"failed: {exc}"
    path = RESULTS.save()
    if path is None:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    text = RESULTS.markdown() + f"\nSaved {path}.json and {path}.md\n"
    if tr is not None:
        tr.write_line("")
        for line in text.splitlines():
            tr.write_line(line)
    else:
        sys.stdout.write(text)
