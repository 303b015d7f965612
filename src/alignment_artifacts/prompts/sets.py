"""Prompt sets: the contrastive data every later stage is computed from.

Two kinds share one type. A *paired* set holds matched ``natural``/``artifact`` prompts in
categories (each artifact prompt has a natural twin on the same topic). A *contrast* set holds
unpaired ``harmful``/``harmless`` instructions. Every prompt carries a binary ``label``: 1 for
the side safety training treats as sensitive (artifact, harmful), 0 for the ordinary side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..cache import stable_hash

POSITIVE_GROUPS = ("artifact", "harmful")
NEGATIVE_GROUPS = ("natural", "harmless")

BUILTIN_SETS: dict[str, str] = {
    "pairs": "170 matched natural/artifact prompt pairs in five categories (the default)",
    "harmful": "72 request-level harmful instructions (label 1)",
    "harmless": "72 ordinary everyday instructions (label 0)",
    "instructions": "harmful + harmless together, unpaired (144 prompts)",
    "ordinary": "480 ordinary everyday instructions (label 0), 20 categories; 'ordinary:train', 'ordinary:val'",
    "borderline": "286 safe prompts that sound sensitive (label 0) and 166 unsafe contrasts (label 1), "
                  "eight categories; 'borderline:train', 'borderline:val'",
}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    label: int  # 1 = artifact/harmful, 0 = natural/harmless
    category: str | None = None
    pair_id: str | None = None

    @property
    def group(self) -> str:
        return ("artifact" if self.pair_id is not None else "harmful") if self.label else (
            "natural" if self.pair_id is not None else "harmless")


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt]
    description: str = ""
    categories: dict[str, str] = field(default_factory=dict)  # name -> description

    @property
    def paired(self) -> bool:
        return bool(self.prompts) and all(p.pair_id is not None for p in self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def labels(self) -> list[int]:
        return [p.label for p in self.prompts]

    def content_hash(self) -> str:
        """Changes whenever any prompt's text, label, category or pairing changes."""
        return stable_hash([asdict(p) for p in self.prompts])

    def filter(self, categories: list[str] | None = None, label: int | None = None) -> PromptSet:
        kept = [p for p in self.prompts
                if (categories is None or p.category in categories) and (label is None or p.label == label)]
        return PromptSet(self.name, kept, self.description,
                         {k: v for k, v in self.categories.items() if categories is None or k in categories})

    def __len__(self) -> int:
        return len(self.prompts)
