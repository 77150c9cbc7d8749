"""Prompt text for the real benchmarks: the user message, wrapped in the model's chat template.

    from experiments.tasks.prompts import math_user_message, render_prompt
    text = render_prompt(math_user_message(problem.question), tokenizer)          # chat template
    text = render_prompt(math_user_message(problem.question), None, think=True)   # no tokenizer

- The math instruction is MetaStone-S1's evaluation text, read from its test files
  (`../shared/data/metastone/aime24.jsonl`: every prompt is the problem, a newline, then
  BOXED_INSTRUCTION). Their RL training file (aime.parquet) says "Let's think step by step and
  output the final answer within \\boxed{}." instead; we evaluate, so we use the test wording.
- With a tokenizer that has a chat template: one user turn through
  `apply_chat_template(..., add_generation_prompt=True, tokenize=False)`.
- Without one (None, or a tokenizer without a template, such as the tiny arith model's): the plain
  form "Question: <message>\\nAnswer:".
- Thinking models: the prompt ends by opening the think span ("<think>\\n"), unless the template
  already opened it (DeepSeek-R1 distills do). think=None decides from the tokenizer: True when
  "<think>" is a single token of its vocabulary.
"""
from __future__ import annotations

from typing import Any, Mapping

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_OPEN = "<think>"


def math_user_message(question: str) -> str:
    """The user turn for a math problem, exactly as MetaStone's test files write it."""
    return f"{question}\n{BOXED_INSTRUCTION}"


def has_chat_template(tokenizer: Any) -> bool:
    """True when `tokenizer` is a transformers tokenizer with a chat template set."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )


def tokenizer_thinks(tokenizer: Any) -> bool:
    """True when "<think>" is one token of the tokenizer's vocabulary (a thinking model's mark)."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return False
    return THINK_OPEN in tokenizer.get_vocab()


def render_prompt(user_message: str, tokenizer: Any = None, think: bool | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text a policy continues: `user_message` in the tokenizer's chat template (or the plain
    "Question: ...\\nAnswer:" form), ending by opening <think> when `think` (None: ask the
    tokenizer). template_kwargs go to apply_chat_template (e.g. {"enable_thinking": True})."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}],
            add_generation_prompt=True,
            tokenize=False,
            **dict(template_kwargs or {}),
        )
        opener = "" if text.endswith(("\n", " ")) else "\n"
    else:
        text = f"Question: {user_message}\nAnswer:"
        opener = " "
    if think is None:
        think = tokenizer_thinks(tokenizer)
    if think and not text.rstrip().endswith(THINK_OPEN):
        text += f"{opener}{THINK_OPEN}\n"
    return text
