"""Run every notebook (quick mode by default) and save one picture each draws to docs/ for the README.

    python scripts/notebook_pictures.py [--full]

The picture is the first image output of the notebook's cell that ``PICK`` names (by a piece of
its source), downscaled to at most 720 pixels wide.
"""

import argparse
import base64
import tempfile
from pathlib import Path

import cv2
import numpy as np
import papermill

ROOT = Path(__file__).resolve().parents[1]
PICK = {
    "01_data.ipynb": "augment_image(image, rng",
    "02_transfer_learning.ipynb": "roc_vgg16_variants",
    "03_bayesian_search.ipynb": "val_loss_vs_lr.png",
    "04_mc_dropout.ipynb": "reliability.png",
    "05_real_data_and_two_step.ipynb": "one-step vs two-step",  # needs ../shared/data
}


def first_png(nb, marker):
    for cell in nb.cells:
        if cell.cell_type == "code" and marker in cell.source:
            for output in cell.outputs:
                data = output.get("data", {})
                if "image/png" in data:
                    return base64.b64decode(data["image/png"])
    raise SystemExit(f"no picture found in the cell containing {marker!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the notebooks in full mode")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all in PICK)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        # No MPLBACKEND here: the kernel's inline backend is what turns figures into outputs.
        parameters = {"QUICK": not args.full, "OUT": work, "DATA": str(ROOT.parent / "shared" / "data")}
        for name, marker in PICK.items():
            if args.names and name not in args.names:
                continue
            path = ROOT / "notebooks" / name
            declared = papermill.inspect_notebook(str(path))
            nb = papermill.execute_notebook(str(path), str(Path(work) / name), cwd=work, kernel_name="python3",
                                            parameters={k: v for k, v in parameters.items() if k in declared},
                                            execution_timeout=3600, progress_bar=False)
            image = cv2.imdecode(np.frombuffer(first_png(nb, marker), np.uint8), cv2.IMREAD_COLOR)
            if image.shape[1] > 720:
                image = cv2.resize(image, None, fx=720 / image.shape[1], fy=720 / image.shape[1],
                                   interpolation=cv2.INTER_AREA)
            out = ROOT / "docs" / f"notebook_{name[:2]}.png"
            cv2.imwrite(str(out), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
            print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
