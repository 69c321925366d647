"""Test-wide settings: offline Hugging Face libraries, bounded CPU threads, fixed seeds, the ``slow`` marker.

Environment variables are set with ``setdefault`` at import time, before any test module imports
huggingface_hub / datasets / transformers / torch (they read them at import), and are inherited by subprocesses.
A test that needs the network-facing code path (for example the Hub test double) must override them in its
subprocess environment, e.g. ``env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=...)``.
"""

import os
import random

# No Hub access at test time: every test runs on shipped or generated data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Split the cores between pytest-xdist workers (PYTEST_XDIST_WORKER_COUNT is set in each worker) so that
# "-n 2" on 2 cores does not run 2 x 2 intra-op threads. A thread count the user set is kept; one we chose is
# recomputed in each worker (workers inherit the environment of the controller, which imported this file first).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_THREADS = str(max(1, _CORES // _WORKERS))
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("_HF_NORMSOFTMAX_TEST_THREADS") == "auto":
    os.environ["_HF_NORMSOFTMAX_TEST_THREADS"] = "auto"
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS

import numpy as np  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow'); runs in CI")


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same random state, whatever ran before it on the same worker."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["moments", "logits"])
def bidirectional_statistics(request, monkeypatch):
    """The test runs once per way the fast path can take bidirectional row variances (key covariance, logits),
    whichever the shape would choose."""
    from hf_normsoftmax import attention_statistics

    monkeypatch.setattr(attention_statistics, "logits_cheaper", lambda *shape: request.param == "logits")
    return request.param
