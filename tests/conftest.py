import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests import the checkout they live in as the package ``largeloss`` (pyproject.toml installs the
# folders ingest/, shards/, train/, eval/, configs/ as largeloss.*): a link named ``largeloss`` to the
# checkout, first on sys.path and on PYTHONPATH, so subprocesses (accelerate launch, python -m ...) import
# the same code, whatever copy of largeloss is installed.
_LINK_DIR = Path(tempfile.mkdtemp(prefix="largeloss-checkout-"))
(_LINK_DIR / "largeloss").symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_LINK_DIR))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_LINK_DIR), os.environ.get("PYTHONPATH")) if p)
for name in [m for m in sys.modules if m == "largeloss" or m.startswith("largeloss.")]:
    del sys.modules[name]

#: real sample files in the datasets' native formats (provenance and terms: tests/fixtures/README.md)
FIXTURES = ROOT / "tests" / "fixtures"


def declare_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG bytes with the SOF0 header claiming ``width`` x ``height`` pixels (the scan data stays as
    it was: what a hostile or damaged file looks like to a decoder that trusts the header)."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "not a baseline JPEG"
    data[sof + 5: sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)
