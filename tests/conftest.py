import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the real sample files, a sibling of the checkout (as in CI)
SHARED = Path(os.environ.get("LARGELOSS_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
