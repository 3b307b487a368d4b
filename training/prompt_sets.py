"""Fixed prompt sets for evaluation, versioned by a hash of their prompts.

    prompt_set = load_prompt_set("v1")            # training/prompts/eval_prompts_v1.txt, or the path of a .txt
    quick = prompt_set.first(4)                   # a smaller set, with its own version
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class PromptSet:
    """A fixed list of prompts; ``version`` = name + a hash of the prompts, so edited sets never pass as the same."""

    name: str
    version: str
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def first(self, count: int | None) -> PromptSet:
        """The first ``count`` prompts as a set of their own (its version hashes only those); None = all of them."""
        if count is None:
            return self
        prompts = self.prompts[:count]
        return PromptSet(self.name, prompt_set_version(self.name, prompts), prompts)


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments are dropped (they do not change the version)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def prompt_set_version(name: str, prompts: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def load_prompt_set(name: str = "v1") -> PromptSet:
    """A packaged set (``training/prompts/eval_prompts_<name>.txt``) or the path of a prompt file."""
    path = Path(name)
    if path.suffix == ".txt" and path.is_file():
        label = path.stem.removeprefix("eval_prompts_")
    else:
        path = PROMPT_DIR / f"eval_prompts_{name}.txt"
        label = name
        if not path.is_file():
            known = sorted(p.stem.removeprefix("eval_prompts_") for p in PROMPT_DIR.glob("eval_prompts_*.txt"))
            raise ValueError(f"unknown prompt set {name!r}; packaged sets: {known}, or pass a .txt path")
    prompts = parse_prompts(path.read_text())
    if not prompts:
        raise ValueError(f"prompt set {path} has no prompts")
    return PromptSet(label, prompt_set_version(label, prompts), tuple(prompts))
