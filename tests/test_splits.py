"""Splits: grouped splits never share a group; both protocols are stratified and seeded."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karyo.errors import SplitError
from karyo.data.splits import split_rows, straddling_groups


def _rows(n_groups, copies, abnormal_every=3):
    rows = []
    for g in range(n_groups):
        label = "abnormal" if g % abnormal_every == 0 else "normal"
        for c in range(copies[g % len(copies)]):
            rows.append({"path": f"{g}_{c}.png", "label": label, "group": f"case{g}"})
    return rows


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_groups=st.integers(9, 80),
       copies=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_grouped_split_never_shares_a_group(seed, n_groups, copies):
    rows = _rows(n_groups, copies)
    parts = split_rows(rows, "grouped", seed)
    assert straddling_groups(rows, parts) == []
    for label in ("normal", "abnormal"):
        assert {p for r, p in zip(rows, parts) if r["label"] == label} == {"train", "val", "test"}


def test_thesis_split_is_per_image_and_leaks_copies():
    rows = _rows(40, [5])
    parts = split_rows(rows, "thesis", seed=1)
    counts = Counter(parts)
    assert abs(counts["train"] / len(rows) - 0.64) < 0.03
    assert abs(counts["test"] / len(rows) - 0.20) < 0.03
    assert straddling_groups(rows, parts)  # augmented copies straddle: the thesis' leakage


def test_same_seed_same_split_other_seed_differs():
    rows = _rows(60, [2, 3])
    assert split_rows(rows, "grouped", 7) == split_rows(rows, "grouped", 7)
    assert split_rows(rows, "grouped", 7) != split_rows(rows, "grouped", 8)


@pytest.mark.parametrize("normal, abnormal, expected", [
    (105, 41, (92, 24, 30)),    # the alpha-dataset, thesis section 4.1
    (376, 316, (442, 111, 139)),  # the augmented set, thesis section 4.2
])
def test_thesis_protocol_gives_the_thesis_counts(normal, abnormal, expected):
    rows = [{"path": f"{i}.png", "label": "normal" if i < normal else "abnormal", "group": str(i)}
            for i in range(normal + abnormal)]
    counts = Counter(split_rows(rows, "thesis", seed=0))
    assert (counts["train"], counts["val"], counts["test"]) == expected


def test_fixed_split_column_is_respected():
    rows = _rows(9, [1])
    for row, part in zip(rows, ["train", "val", "test"] * 3):
        row["split"] = part
    assert split_rows(rows, "grouped") == ["train", "val", "test"] * 3


def test_too_few_groups_is_a_clear_error():
    rows = [{"path": "a", "label": "abnormal", "group": "g"},
            {"path": "b", "label": "normal", "group": "h"}]
    with pytest.raises(SplitError, match="label 'abnormal' has 1 group\\(s\\); at least 3 are needed"):
        split_rows(rows, "grouped")
    with pytest.raises(SplitError, match="unknown split protocol"):
        split_rows(rows, "random")
