"""The pipeline order holds: no pflm stage imports a higher one, and the two backends never import each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_goes_against_the_pipeline_order():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_layers.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "0 against the pipeline order" in out.stdout


def test_pflm_never_imports_data_prep():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "pflm").rglob("*.py")
                 if "data_prep" in "".join(line for line in p.read_text().splitlines() if "import" in line)]
    assert offenders == []
