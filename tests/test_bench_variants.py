"""bench/variants.py on a tiny model: the table comes out, and a rerun resumes from the kept state
without searching or evaluating anything again (the real run takes hours)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def variants_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("variants_bench", ROOT / "bench" / "variants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_table_is_printed_and_a_rerun_resumes_without_repeating_work(tmp_path, monkeypatch, capsys):
    loaded = tiny_model("qwen2", layers=2)
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bench keeps its state
    monkeypatch.setattr(sys, "argv", ["variants.py", "--model", str(folder), "--variants", "median,norm_preserving",
                                      "--scales", "1.0,1.5", "--depths", "0.5", "--n-search", "4", "--n-eval", "4",
                                      "--judged", "2", "--max-tokens", "3", "--budget", "600"])
    assert variants_module().main() == 0
    first = capsys.readouterr().out
    rows = {line.split()[0] for line in first.splitlines()[2:]}
    assert {"unmodified", "plain", "median", "norm_preserving", "reach"} <= rows

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished search or evaluation ran again")

    again = variants_module()
    monkeypatch.setattr(again, "Scorer", must_not_run)
    monkeypatch.setattr(again, "evaluate_against", must_not_run)
    assert again.main() == 0
    second = capsys.readouterr()
    assert second.out == first  # the kept JSON gives back the same table, to the last digit
    assert "resuming" in second.err and "2 searches, 3 evaluations" in second.err

    # a judge whose rule changed (its key) starts afresh: verdicts it did not make are never resumed
    from alignment_artifacts.evaluation import metrics

    monkeypatch.setattr(metrics, "LOOP_MIN_WORDS", metrics.LOOP_MIN_WORDS + 1)
    assert variants_module().main() == 0
    assert "resuming" not in capsys.readouterr().err
