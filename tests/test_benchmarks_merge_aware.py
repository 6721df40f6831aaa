"""The merge-aware and merged-weights benchmarks end to end on a tiny random Llama (--quick --model tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--model", "tiny", "--out", str(out)]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_merge_aware_benchmark_reports_an_exact_merge(tmp_path: Path) -> None:
    result = _run("merge_aware", tmp_path, "--steps", "2")
    rows = {row["row"]: row for row in result["rows"]}
    aware = rows["merge-aware LoRA, merged (default merge)"]
    assert aware["max_logit_change_at_merge"] == 0.0
    assert aware["ppl"] == rows["merge-aware LoRA, unmerged"]["ppl"]
    assert set(result["seconds_per_step"]) == {"plain", "merge-aware"}


def test_merged_weights_benchmark_sees_no_drift_on_the_qadapt_side(tmp_path: Path) -> None:
    result = _run("merged_weights", tmp_path)
    ours = result["qadapt merged_weights"]
    assert ours["model_weight_drift"] == 0.0 and ours["handed_out_drift"] == 0.0
    theirs = result["peft merge_adapter+state_dict+unmerge"]
    assert "error" in theirs or theirs["model_weight_drift"] > 0.0  # PEFT requantizes on every cycle
