import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `inductor` compile C++ kernels for minutes: they run only with RUN_INDUCTOR_TESTS=1."""
    if os.environ.get("RUN_INDUCTOR_TESTS") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="inductor compile takes minutes; set RUN_INDUCTOR_TESTS=1 to run it")
    for item in items:
        if "inductor" in item.keywords:
            item.add_marker(skip)
