"""`PRMFormat`: how an external process reward model built on a language model reads a path, and
the text it reads (`prm_text`): the layouts of the open PRMs that researchers compare a SPRM against.

Three layouts cover them (`PRM_FORMATS` names the presets):
- "tag" (`math_shepherd`, peiyi9979/math-shepherd-mistral-7b-prm): the text
  `question + " " + "Step 1: " + step_1 + " ки" + "\\n" + "Step 2: " + step_2 + " ки" + "\\n" ...` (the
  model card's and the Math-Shepherd data's layout), the tokenizer's special tokens added; a step
  is read at the last token of its tag. A step that already starts with its own "Step k:" (or
  "## Step k:", "**Step k:**", "Step k.") keeps it and gets no second one.
- "chat" (`rlhflow`, RLHFlow/Llama3.1-8B-PRM-Deepseek-Data and -Mistral-Data, the PRM of
  search-and-learn): a conversation in the model's own chat template, the first user turn the
  question and the first step, each later user turn one step, each assistant answer "+"; a step
  is read at the token before its answer (the logits that predict it).
- "chat_tag" (`qwen_prm`, Qwen/Qwen2.5-Math-PRM-7B and -72B): the chat template of a system turn,
  the question as the user turn and the steps as the assistant turn, each step followed by the
  tag "<extra_0>"; a step is read at its tag.

How a reading becomes a score (`reader`): "lm" (the first two): the LM's next-token logits for the
good token "+" against the bad token "-", P(+) / (P(+) + P(-)); "head" (Qwen's): a two-class head
on the last hidden state (`score.0`, ReLU, `score.2`), the softmax's second class.

Each step's text is its decoded text without think tags and surrounding whitespace (the policy's
separator goes; the layout's joiners stand in for it). `prm_text` returns the text and, per step, the
character offset the reading hangs on; `scorers.lm_prm_scorer` turns offsets into token positions
through the tokenizer's offset mapping, so the whole text is tokenised at once, as the PRMs' own
code does, and no token is looked up by id.

    fmt = resolve_prm_format("math_shepherd")
    prm_text(fmt, tokenizer, prefix)   # PRMText(text=..., read_ends=(...,))
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from treesearch.records import Prefix

LAYOUTS: tuple[str, ...] = ("tag", "chat", "chat_tag")
READERS: tuple[str, ...] = ("lm", "head")
# a step that numbers itself: "Step 1:", "## Step 1:", "**Step 1:**", "Step 1." or "step 1)"
NUMBERED_STEP = re.compile(r"[#*\s]*step\s*\d+\s*[:.)]", re.IGNORECASE)
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PRMFormat:
    """The layout a PRM was trained on and how it scores (module docstring).

    layout: "tag", "chat" or "chat_tag".
    step_tag: tag layouts: appended to each step; the step is read at the tag's last token.
    step_join: tag layouts: between a step's tag and the next step.
    step_prefix: tag layout: written before each step, "{k}" replaced by the step's number from 1
        ("Step {k}: " for Math-Shepherd); left out for a step whose text already starts with
        "Step <number>" and ":", "." or ")" (any case, after optional "#" or "*" marks). Empty: none.
    question_join: between the question and the first step (tag layout; the first user turn in chat).
    system: chat layouts: a system turn before the question when not empty.
    reader: "lm" (next-token logits of good against bad) or "head" (a two-class score head).
    good, bad: reader "lm": the tokens whose next-token probabilities make a step's score,
        P(good) / (P(good) + P(bad)); each must encode to one token (or pass the ids to the scorer).
    drop: marker strings removed from every step's text before it is laid out (a thinking
        policy's think tags: the PRMs were trained on plain solution steps).
    """

    layout: str = "tag"
    step_tag: str = " ки"
    step_join: str = "\n"
    step_prefix: str = ""
    question_join: str = " "
    system: str = ""
    reader: str = "lm"
    good: str = "+"
    bad: str = "-"
    drop: tuple[str, ...] = ("<think>", "</think>")

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"PRMFormat.layout={self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.reader not in READERS:
            raise ValueError(f"PRMFormat.reader={self.reader!r}; valid: {', '.join(READERS)}")
        for name in ("good", "bad"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"PRMFormat.{name}={getattr(self, name)!r} must be a non-empty string")
        if self.good == self.bad:
            raise ValueError(f"PRMFormat.good and .bad are both {self.good!r}: a score needs two different tokens")
        if self.layout != "chat" and not self.step_tag.strip():
            raise ValueError(f"PRMFormat.step_tag={self.step_tag!r}: a tag layout reads each step at a visible tag")


PRM_FORMATS: dict[str, PRMFormat] = {
    "math_shepherd": PRMFormat(layout="tag", step_prefix="Step {k}: "),
    "rlhflow": PRMFormat(layout="chat"),
    "qwen_prm": PRMFormat(layout="chat_tag", step_tag="<extra_0>", step_join="", system=QWEN_SYSTEM, reader="head"),
}


def resolve_prm_format(value: str | PRMFormat) -> PRMFormat:
    """A PRMFormat, or the preset of that name (ValueError naming the presets for another)."""
    if isinstance(value, PRMFormat):
        return value
    if value not in PRM_FORMATS:
        raise ValueError(f"prm_format={value!r}; valid: {', '.join(PRM_FORMATS)} (or a PRMFormat)")
    return PRM_FORMATS[value]


@dataclass(frozen=True)
class PRMText:
    """What the PRM reads for one path: its text and, per step, the character offset its reading
    hangs on (tag: where the step's tag ends; chat: where the step's assistant answer starts)."""

    text: str
    read_ends: tuple[int, ...]


def step_texts(path: Prefix, drop: tuple[str, ...] = ()) -> list[str]:
    """Each step's text without the drop markers and surrounding whitespace (the policy's
    separator goes)."""
    texts = []
    for step in path.steps:
        text = step.text
        for marker in drop:
            text = text.replace(marker, "")
        texts.append(text.strip())
    return texts


def prm_text(fmt: PRMFormat, tokenizer: Any, path: Prefix) -> PRMText:
    """The text fmt lays out for path (module docstring); chat layouts render through the
    tokenizer's chat template."""
    steps = step_texts(path, tuple(fmt.drop))
    if fmt.layout == "tag":
        return tag_text(fmt, path.problem.question, steps)
    if fmt.layout == "chat_tag":
        return chat_tag_text(fmt, tokenizer, path.problem.question, steps)
    return chat_text(fmt, tokenizer, path.problem.question, steps)


def tag_text(fmt: PRMFormat, question: str, steps: list[str]) -> PRMText:
    """question + join + (prefix + step + tag + step_join) per step; each step read where its tag
    ends."""
    text, ends = question + fmt.question_join, []
    for k, step in enumerate(steps, start=1):
        text += step_prefix(fmt, k, step) + step + fmt.step_tag
        ends.append(len(text))
        text += fmt.step_join
    return PRMText(text, tuple(ends))


def step_prefix(fmt: PRMFormat, k: int, step: str) -> str:
    """fmt.step_prefix for step number k, or "" when step already starts with a "Step <n>:" of its
    own (a policy prompted to number its steps, as search-and-learn's "## Step 1:")."""
    if not fmt.step_prefix or NUMBERED_STEP.match(step):
        return ""
    return fmt.step_prefix.replace("{k}", str(k))


def chat_text(fmt: PRMFormat, tokenizer: Any, question: str, steps: list[str]) -> PRMText:
    """The conversation (question + first step, then one step per user turn, each answered with
    fmt.good) in the tokenizer's chat template; each step read where its answer starts: the
    conversation up to its user turn, rendered with the generation prompt, must be a prefix of
    the whole (ValueError naming the tokenizer otherwise)."""
    check_chat_template(tokenizer)
    turns, prompts = system_turns(fmt), []
    for k, step in enumerate(steps):
        turns.append({"role": "user", "content": question + fmt.question_join + step if k == 0 else step})
        prompts.append(render(tokenizer, turns, add_generation_prompt=True))
        turns.append({"role": "assistant", "content": fmt.good})
    text = render(tokenizer, turns, add_generation_prompt=False)
    for prompt in prompts:
        check_prefix(tokenizer, text, prompt)
    return PRMText(text, tuple(len(prompt) for prompt in prompts))


def chat_tag_text(fmt: PRMFormat, tokenizer: Any, question: str, steps: list[str]) -> PRMText:
    """The system turn, the question as the user turn and the steps as the assistant turn (each
    followed by the tag, joined by step_join) in the tokenizer's chat template; each step read
    where its tag ends. The assistant turn must follow the prompt rendered with the generation
    prompt verbatim (ValueError naming the tokenizer otherwise)."""
    check_chat_template(tokenizer)
    turns = system_turns(fmt) + [{"role": "user", "content": question}]
    prompt = render(tokenizer, turns, add_generation_prompt=True)
    answer, ends = "", []
    for k, step in enumerate(steps):
        answer += (fmt.step_join if k else "") + step + fmt.step_tag
        ends.append(len(prompt) + len(answer))
    text = render(tokenizer, turns + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    check_prefix(tokenizer, text, prompt + answer)
    return PRMText(text, tuple(ends))


def system_turns(fmt: PRMFormat) -> list[dict[str, str]]:
    """The system turn of a chat layout, none when fmt.system is empty."""
    return [{"role": "system", "content": fmt.system}] if fmt.system else []


def check_prefix(tokenizer: Any, text: str, prefix: str) -> None:
    """ValueError naming the tokenizer's chat template when text does not start with prefix."""
    if not text.startswith(prefix):
        raise ValueError(
            f"the chat template of {tokenizer_name(tokenizer)} does not render a conversation's "
            "earlier turns (with the generation prompt) as the start of the whole: the chat "
            "layout cannot place its readings; use a tag layout"
        )


def render(tokenizer: Any, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text of turns (not tokenised)."""
    return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt))


def check_chat_template(tokenizer: Any) -> None:
    """ValueError naming the tokenizer when it has no chat template (the chat layouts need one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {tokenizer_name(tokenizer)} has no chat template: the chat layouts "
            "(prm_format=rlhflow, qwen_prm) need one; use the tag layout (prm_format=math_shepherd)"
        )


def tokenizer_name(tokenizer: Any) -> str:
    """The folder or hub name a tokenizer was loaded from, else its class."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
