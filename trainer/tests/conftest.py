import sys
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1]
REPO = TRAINER.parent
sys.path.insert(0, str(TRAINER))

SHARED = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_oct():
    if not (SHARED / "oct").is_dir():
        pytest.skip("../shared/data/oct is absent; real-image tests need the shared OCT data")
    return SHARED / "oct"
