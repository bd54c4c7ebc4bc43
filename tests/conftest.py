import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("URA_MONAI_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@pytest.fixture
def shared_data():
    """Root of the real sample data (../shared/data); skips the test when it is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules dominated by small tensor ops: on a shared 2-core machine one intra-op thread avoids
    oversubscription (several times faster under load) and keeps float reductions in a fixed order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
