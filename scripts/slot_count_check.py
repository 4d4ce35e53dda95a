"""How often ``read_slots`` counts each slot of an assembled set as its crops do.

Usage:
    python scripts/slot_count_check.py /work/tmp-det/g /work/shared/data/gband612
"""

import collections
import csv
import sys
from pathlib import Path

from karyo.karyograms.assemble import cell_crops
from karyo.karyograms.slots import read_slots, slot_counts


def main(assembled, cells_dir):
    rows = list(csv.DictReader(open(Path(assembled) / "manifest.csv")))
    wrong, errors = 0, collections.Counter()
    for row in rows:
        read = slot_counts(read_slots(Path(assembled) / row["path"]))
        crops = {s: len(v) for s, v in cell_crops(cells_dir, row["cell"]).items()}
        diff = {s: (read[s], crops[s]) for s in read if read[s] != crops[s]}
        wrong += bool(diff)
        errors.update(diff.items())
    print(f"{len(rows) - wrong} / {len(rows)} karyograms read with every slot's count right")
    print("slot: (read, crops) x times:", errors.most_common(10))


if __name__ == "__main__":
    main(*sys.argv[1:3])
