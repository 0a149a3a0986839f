import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The trainer remembers model-file hashes in $LORA_TRAINER_CACHE (library/file_hashes.py): never the user's own
_CACHE_HOME = tempfile.mkdtemp(prefix="lora-trainer-tests-cache-")
os.environ["LORA_TRAINER_CACHE"] = _CACHE_HOME

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> str:
    """A tiny SD1.5 diffusers folder, built once per test module (a module may define its own to override)."""
    from tests.train_helpers import save_tiny_sd15

    return save_tiny_sd15(str(tmp_path_factory.mktemp("models") / "sd15"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> str:
    """A tiny SDXL diffusers folder, built once per test module."""
    from tests.fixtures.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(str(tmp_path_factory.mktemp("models") / "sdxl")).diffusers_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A KS folder dataset: '2_sks photo' with two captioned 64 px pictures."""
    from tests.train_helpers import make_images

    root = tmp_path_factory.mktemp("data")
    make_images(str(root / "2_sks photo"), 2)
    return str(root)


def pytest_collection_modifyitems(config, items):
    """Tests marked `inductor` compile C++ kernels for minutes: they run only with RUN_INDUCTOR_TESTS=1."""
    if os.environ.get("RUN_INDUCTOR_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="inductor compile takes minutes; set RUN_INDUCTOR_TESTS=1 to run it")
    for item in items:
        if "inductor" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _glibc_malloc_defaults():
    """The trainer keeps freed memory in the heap once set-up is done (library/host_memory.py); the test process
    runs hundreds of trainings of every size, so it keeps glibc's defaults. tests/test_host_memory.py checks the
    switch itself in a child process."""
    from library import host_memory

    switch = host_memory.keep_freed_memory_in_heap
    host_memory.keep_freed_memory_in_heap = lambda: False
    yield
    host_memory.keep_freed_memory_in_heap = switch


@pytest.fixture(autouse=True, scope="session")
def _remove_cache_home():
    yield
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)
