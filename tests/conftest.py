"""Shared fixtures: small generated karyogram-like images and the optional shared data."""

import os
from pathlib import Path

import pytest

from tests.common import blob_image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: ../shared/data beside the repository; absent in a user's fresh clone.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """The shared real-data folder, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def class_folder(tmp_path):
    """A folder with normal/ and abnormal/ sub-folders of small PNG images."""
    import cv2

    root = tmp_path / "karyograms"
    for label, count in (("normal", 6), ("abnormal", 4)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(root / label / f"{label}_{i}.png"), blob_image(i, abnormal=label == "abnormal"))
    return root
