"""A judge for tests: its label follows the answer's length, so a changed answer usually changes its
label, and it counts the answers it was asked about."""

from __future__ import annotations

from alignment_artifacts.judge import Verdict


class LengthJudge:
    name = "length"
    key = "length"

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, prompts, answers, progress=None):
        self.calls += len(answers)
        return [Verdict(("refusal", "evasion", "compliance")[len(a) % 3], 1.0) for a in answers]
