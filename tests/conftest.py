"""Suite-wide settings: threads per test process, and the longest tests first.

`python -m pytest -n auto` (pytest-xdist) runs the tests in one worker process per CPU core. The models here
are small, so two processes with one torch thread each get more done than one process with two threads; each
worker therefore uses its share of the cores, and so do the programs it starts (train.py, sample.py, Jupyter
kernels inherit OMP_NUM_THREADS). Without -n the tests run in this one process with torch's default threads.

The notebooks and the other end-to-end runs (marked slow) take most of the time, so they are handed out first,
one test at a time to whichever worker is free (xdist's default hands out consecutive chunks, which gave one
worker every notebook): a long test started last would leave the other cores idle while it finishes.
"""

import os

import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))

if WORKERS:
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)            # for the processes the tests start
    torch.set_num_threads(THREADS)


def pytest_configure(config):
    """Under -n, hand tests out one at a time (unless --maxschedchunk was given)."""
    if getattr(config.option, "maxschedchunk", "") is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(session, config, items):
    """Order: solutions notebooks, notebooks, other slow tests, the rest (collection order within each)."""
    def rank(item) -> int:
        if getattr(item, "originalname", "") == "test_notebook_executes_without_errors":
            return 0 if "_solutions" in item.name else 1
        return 2 if item.get_closest_marker("slow") else 3
    items.sort(key=rank)                                    # stable: the files' order within each rank
