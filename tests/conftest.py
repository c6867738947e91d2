import importlib
import io
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory):
    """A federation CA with a server certificate and three client credential folders."""
    from privacy import pki

    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    for name in ("alice", "bob", "carol", "dave"):
        pki.issue_client(d, name)
    return d


@pytest.fixture(scope="session")
def png_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def benchmark_script():
    """Import a script of ``benchmarks/`` by module name (they are scripts, not a package)."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load
