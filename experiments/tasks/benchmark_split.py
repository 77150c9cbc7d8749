"""Which problems of a real benchmark a search run gets: the split check, `count`, file order or a
seeded shuffle, shared by the benchmark task modules (gsm8k, math500, aime, ceval).

Each of those modules loads its file with its own loader and passes the problems through
`select_problems`, which gives it the `generate_problems(split, count, seed, cfg)` of the task
interface (`experiments.search.Task`, as `experiments.tasks.arith` defines it):

    from experiments.tasks import gsm8k
    from experiments.tasks.benchmark_split import BenchmarkConfig
    gsm8k.generate_problems("test", 50, seed=0, cfg=BenchmarkConfig())                # first 50 in file order
    gsm8k.generate_problems("test", None, seed=0, cfg=BenchmarkConfig())              # all 1319
    gsm8k.generate_problems("test", 50, seed=1, cfg=BenchmarkConfig(shuffle=True))    # 50 drawn by seed 1

Rules (the same for every benchmark):
- split: the names the benchmark has (GSM8K train / test; MATH-500, AIME and C-Eval only test);
  another name is a ValueError that lists the valid ones, raised before any file is read.
- count: the first `count` problems of the order; None or -1 (ALL) takes the whole split; more
  than the split holds is a ValueError naming both numbers (never a silently shorter run).
- order: file order, or with shuffle=True a permutation drawn by random.Random(seed), so a
  smaller count is a prefix of a larger one with the same seed (in both orders). Without shuffle
  the seed is not used.
- ids: unique over the whole file (a run's records and its resume key on them); a repeated id is
  a DataFormatError naming the file, the repeat's line and the first's.

The config dataclasses of the tasks are frozen and checked on construction (errors name the bad
value); `experiments/conf/task/*.yaml` build them through `_target_`.
"""
from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from typing import Sequence

from experiments.tasks.grading import LENIENT, check_grading
from experiments.tasks.loader_errors import DataFormatError
from treesearch.config_checks import check_flag  # noqa: F401 (re-exported to the task loaders)
from treesearch.records import Problem

ALL = -1  # count meaning "the whole split" (None means the same)
TAKE_ALL_HINT = "(count=-1 or null takes them all)"  # a search's task.count; training counts must be >= 1


def check_path(owner: str, value: object) -> None:
    """ValueError unless value is None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{owner}.path={value!r} must be a file path or null")


@dataclass(frozen=True)
class BenchmarkConfig:
    """How a benchmark task (gsm8k, math500, ceval) reads its problems.

    path: the data file to read instead of `$TREESEARCH_DATA_DIR/...` or `../shared/data/...`
        (same format as the shared file), for whatever split is asked (GSM8K's train and test
        alike: experiments.train refuses held-out problems it would train on); None reads the
        shared copy of each split.
    hub: read the benchmark from the datasets hub instead (needs the optional `datasets` package
        and the hub or its cache; GSM8K and MATH-500 only). Ignores path.
    shuffle: draw the problems in a permutation seeded by the task's seed instead of file order.
    grading: "lenient" (experiments.tasks.grading's reading) or "reference" (MetaStone-S1's rule);
        math500 and ceval record it in their problems' meta for `grade` (gsm8k grades lenient).
    """

    path: str | None = None
    hub: bool = False
    shuffle: bool = False
    grading: str = LENIENT

    def __post_init__(self) -> None:
        check_path("BenchmarkConfig", self.path)
        check_flag("BenchmarkConfig", "hub", self.hub)
        check_flag("BenchmarkConfig", "shuffle", self.shuffle)
        check_grading("BenchmarkConfig", self.grading)


def check_split(task: str, split: str, valid: Sequence[str]) -> None:
    """ValueError naming the valid splits unless split is one of them."""
    if split not in valid:
        names = ", ".join(repr(name) for name in valid)
        raise ValueError(f"{task}: split={split!r}; valid: {names}")


def check_count(task: str, count: int | None) -> None:
    """ValueError unless count is None, -1 or an integer >= 0 (checked before loading)."""
    if count is None:
        return
    if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < ALL:
        raise ValueError(f"{task}: count={count!r} must be an integer >= 0, or -1 / null for the whole split")


def check_generated_count(task: str, count: object) -> None:
    """ValueError unless count is an integer >= 0: the check of the generated tasks (arith,
    countdown), which have no whole split to take, so null / -1 mean nothing there. 0 gives no
    problems, as it does for a benchmark."""
    if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{task}: count={count!r} must be an integer >= 0 (how many problems to generate; "
                         "a generated task has no whole split, so null / -1 do not apply)")


def select_problems(
    problems: Sequence[Problem], task: str, split: str, count: int | None, seed: int, shuffle: bool
) -> list[Problem]:
    """The first `count` problems (all for None / -1) in file order or a seeded permutation."""
    check_count(task, count)
    check_unique_ids(problems, task)
    wanted = len(problems) if count is None or count == ALL else int(count)
    if wanted > len(problems):
        raise ValueError(
            f"{task}: count={wanted} but the {split} split has only {len(problems)} problems {TAKE_ALL_HINT}"
        )
    order = list(problems)
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[:wanted]


def check_unique_ids(problems: Sequence[Problem], task: str) -> None:
    """DataFormatError at a problem whose id an earlier one has (the loaders put the file and the
    line, or parquet row, in meta "source" and "line" / "row"); ValueError naming the task and
    both problems' places in its list when the problems do not say where they come from."""
    first: dict[str, int] = {}
    for index, problem in enumerate(problems):
        earlier = first.setdefault(problem.id, index)
        if earlier == index:
            continue
        unit = "row" if "row" in problem.meta else "line"
        where, then = problem.meta.get(unit), problems[earlier].meta.get(unit)
        unique = "ids must be unique (records and resume key on them)"
        if "source" in problem.meta and isinstance(where, int):
            message = f"problem id {problem.id!r} repeats the one at {unit} {then}: {unique}"
            raise DataFormatError(problem.meta["source"], where, message, unit=unit)
        raise ValueError(f"{task}: problems {earlier + 1} and {index + 1} share the id {problem.id!r}: {unique}")
