"""What `pip install .` delivers: one top-level package `largeloss` with the configs inside, usable from any folder."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_holds_one_package_with_its_configs(tmp_path: Path):
    # --no-build-isolation: setuptools is installed here, and CI may not reach an index mid-test
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("largeloss-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"largeloss"}  # no generic "train", "eval", ... next to other projects' packages
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"configs/demo.yaml", "configs/demo_finetune.yaml", "configs/methods/ll_r.yaml"} <= shipped
    assert {f"largeloss/{p}" for p in shipped} <= set(names)
    for module in ("__init__.py", "train/demo.py", "train/main.py", "ingest/demo_images.py", "shards/format.py"):
        assert f"largeloss/{module}" in names
    assert not [n for n in names if "/tests/" in n or n.startswith("largeloss/docs/")]

    # installed as a wheel (not editable) in a fresh environment, used from an unrelated folder
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import largeloss, largeloss.configs as c; "
             "print(largeloss.__file__); print(c.path('demo.yaml')); print(c.method('ll_ct'))")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=elsewhere,
                         env={"PATH": "/usr/bin:/bin"}).stdout.split()
    site = Path(out[0]).parent
    assert site != ROOT and site.name == "largeloss" and "site-packages" in site.parts
    assert out[1:] == [str(site / "configs" / "demo.yaml"), str(site / "configs" / "methods" / "ll_ct.yaml")]
    helped = subprocess.run([str(venv / "bin" / "largeloss-demo"), "--help"], capture_output=True, text=True,
                            cwd=elsewhere, env={"PATH": "/usr/bin:/bin"})
    assert helped.returncode == 0 and "--finetune" in helped.stdout
