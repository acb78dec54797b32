"""The end-to-end examples run for a few steps, in effikern mode and as the PyTorch baseline."""

import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import finetune_transformer  # noqa: E402
import train_mobilenet  # noqa: E402


@pytest.mark.parametrize("baseline", [False, True], ids=["effikern", "baseline"])
def test_train_mobilenet_runs(baseline, capsys):
    args = ["--epochs", "2", "--teacher-epochs", "1", "--train-size", "256", "--batch-size", "64", "--device", "cpu"]
    result = train_mobilenet.main(args + (["--baseline"] if baseline else []))
    out = capsys.readouterr().out
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["images_per_s"] > 0
    assert "head pruned to 90%" in out
    if not baseline:  # the pruned head went through optimize(), which reports its decision
        assert "replaced" in out or "left" in out


@pytest.mark.parametrize("baseline", [False, True], ids=["effikern", "baseline"])
def test_finetune_transformer_runs(baseline, capsys):
    args = ["--pretrain-epochs", "1", "--finetune-epochs", "1", "--train-size", "128", "--batch-size", "32",
            "--device", "cpu"]
    result = finetune_transformer.main(args + (["--baseline"] if baseline else []))
    out = capsys.readouterr().out
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert "feed-forward pruned to 70%" in out and result["tokens_per_s"] > 0
