"""Copy the browser test's screenshots into docs/screenshots/, shrunk for the repository.

    python scripts/publish_screenshots.py [SOURCE]   (default output/frontend-screenshots, as tests/test_frontend_browser.py writes)

Each PNG is scaled to 1200 px wide and stored with a 256-colour palette (about a tenth of the size).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

PACK_DIR = Path(__file__).resolve().parent.parent
WIDTH = 1200


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else PACK_DIR / "output" / "frontend-screenshots"
    shots = sorted(p for p in source.glob("*.png") if not p.name.startswith("timeout-"))
    if not shots:
        raise SystemExit(f"no screenshots in {source}: run bash scripts/test.sh tests/test_frontend_browser.py first")
    dest = PACK_DIR / "docs" / "screenshots"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for shot in shots:
        with Image.open(shot) as im:
            im = im.convert("RGB")
            small = im.resize((WIDTH, round(im.height * WIDTH / im.width)), Image.LANCZOS)
            name = shot.name.replace(" ", "_").replace(",", "")
            small.quantize(256, method=Image.Quantize.MEDIANCUT).save(dest / name, optimize=True)
        print(f"docs/screenshots/{name}: {(dest / name).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
