"""The embedded tasks a tiny policy is trained on by SFT: where their training pairs and their
tokenizer corpus come from, and their default difficulty.

    from experiments.sft_tasks import SFT_TASKS, get_sft_task
    task = get_sft_task("countdown")
    pairs = task.training_pairs(task.default_config, 30_000, seed=0)   # [(prompt, completion), ...]
    tokenizer = build_tokenizer(corpus=task.tokenizer_corpus(pairs))

`arith` has one reference solution per problem and a practically unbounded train split, so each
pair is a new problem. `countdown`'s default train split holds ~9.9k problems, so its pairs cycle
over them, each pass drawing another random valid solution (many paths are correct: the policy
should learn to produce diverse ones) or, for half the pairs, an honest attempt that may miss
the target (so the policy's arithmetic stays honest and a failure is visible to a verifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from experiments.tasks import arith, countdown

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class SFTTask:
    """name: the task's name (metric prefix, checkpoint folder tiny-<name>); module: the task
    module (generate_problems, prompt_text, grade, extract_answer, DEFAULT_TEMPERATURE);
    default_config: its difficulty knob at the default; make_pairs: (config, count, seed) ->
    `count` (prompt, reference completion) pairs from the train split; own_tokenizer: learn the
    tokenizer from this task's text (else the default arith corpus)."""

    name: str
    module: ModuleType
    default_config: Any
    make_pairs: Callable[[Any, int, int], Pairs]
    own_tokenizer: bool = False

    @property
    def split_version(self) -> int | None:
        """The task's SPLIT_VERSION (which problems its splits hold), None when it has none."""
        return getattr(self.module, "SPLIT_VERSION", None)

    def training_pairs(self, config: Any, count: int, seed: int) -> Pairs:
        if count < 1:
            raise ValueError(f"{self.name}: training pair count={count!r} must be >= 1")
        return self.make_pairs(config, count, seed)

    def tokenizer_corpus(self, pairs: Pairs, size: int = 4000) -> list[str] | None:
        """Texts to learn the tokenizer from (None: the tokenizer's default arith corpus)."""
        return [prompt + completion for prompt, completion in pairs[:size]] if self.own_tokenizer else None


def arith_pairs(config: arith.ArithConfig, count: int, seed: int) -> Pairs:
    """One new train problem per pair, with its (single) reference solution."""
    problems = arith.generate_problems("train", count, seed=seed, cfg=config)
    return [(arith.prompt_text(p), arith.solution_text(p)) for p in problems]


COUNTDOWN_TRAIN_PROBLEMS = 9_000  # of the ~9.9k the default train split holds
COUNTDOWN_SOLVED_SHARE = 0.5  # the rest are honest attempts (countdown.training_pairs says why)


def countdown_pairs(config: countdown.CountdownConfig, count: int, seed: int) -> Pairs:
    """Pairs cycling over the train problems: half valid solutions (another random one on each
    pass), half honest attempts that may miss the target."""
    problems = countdown.generate_problems("train", COUNTDOWN_TRAIN_PROBLEMS, seed=seed, cfg=config)
    return countdown.training_pairs(problems, count, seed, solved_share=COUNTDOWN_SOLVED_SHARE)


SFT_TASKS: dict[str, SFTTask] = {
    "arith": SFTTask("arith", arith, arith.ArithConfig(), arith_pairs),
    "countdown": SFTTask("countdown", countdown, countdown.CountdownConfig(), countdown_pairs, own_tokenizer=True),
}


def get_sft_task(name: str) -> SFTTask:
    """The registered task, or a ValueError listing the valid names."""
    if name not in SFT_TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(SFT_TASKS)}")
    return SFT_TASKS[name]
