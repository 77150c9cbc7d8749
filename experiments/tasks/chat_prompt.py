"""`ChatPrompt`: a policy's `prompt_fn` (Problem -> text) that renders a benchmark task's user
message through a checkpoint's chat template, so Hydra can build it from paths alone.

Usage:
    prompt_fn = ChatPrompt("outputs/models/smollm2-135m-instruct")                  # GSM8K, think from the vocabulary
    prompt_fn = ChatPrompt("/models/XBai-o4", "experiments.tasks.math500", think=True)
    text = prompt_fn(problem)      # "<|im_start|>user\\n<question>\\nPlease reason step by step, ...<|im_start|>assistant\\n"

    # experiments/conf/policy/*.yaml
    prompt_fn:
      _target_: experiments.tasks.chat_prompt.ChatPrompt
      tokenizer_path: ${..path}
      task_module: ${task.module}
      think: true

The text is `<task_module>.prompt_text(problem, tokenizer, think=think)` (the math tasks and C-Eval
take a tokenizer: `experiments.tasks.prompts.render_prompt`): one user turn through the chat
template with the generation prompt, then "<think>\\n" when think (None: when "<think>" is one
token of the vocabulary). Only the tokenizer is loaded (lazily, once per folder and process), never
the model; a tokenizer without a chat template gives the plain "Question: ...\\nAnswer:" form, as
render_prompt does. A template that writes the BOS token itself (DeepSeek-R1 distills) while the
tokenizer also adds it on encoding (as the policies encode prompts, `add_special_tokens=True`)
would give two BOS tokens: the text then starts after the template's BOS. The embedded tasks (arith, countdown) write their own prompt and take no
tokenizer: a ValueError at construction says so.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from treesearch.records import Problem


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer_path: str) -> Any:
    """The transformers tokenizer of a checkpoint folder, loaded once per path and process."""
    from transformers import AutoTokenizer

    if not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(f"ChatPrompt.tokenizer_path={tokenizer_path!r} is not a folder")
    return AutoTokenizer.from_pretrained(tokenizer_path)


@functools.lru_cache(maxsize=32)
def task_prompt_fn(task_module: str) -> Callable[..., str]:
    """`<task_module>.prompt_text`, checked to take (problem, tokenizer, think)."""
    try:
        module = importlib.import_module(task_module)
    except ImportError as error:
        raise ValueError(f"ChatPrompt.task_module={task_module!r} cannot be imported: {error}") from error
    prompt_text = getattr(module, "prompt_text", None)
    if prompt_text is None:
        raise ValueError(f"ChatPrompt.task_module={task_module!r} has no prompt_text")
    parameters = inspect.signature(prompt_text).parameters
    if "tokenizer" not in parameters or "think" not in parameters:
        raise ValueError(
            f"ChatPrompt.task_module={task_module!r}: its prompt_text takes no tokenizer / think (an embedded "
            "task writes its own prompt; use it directly as prompt_fn)"
        )
    return prompt_text


@dataclass(frozen=True)
class ChatPrompt:
    """A prompt_fn over a chat template.

    tokenizer_path: the checkpoint folder whose tokenizer (and chat template) renders the prompt;
        normally the policy's own path.
    task_module: the task whose `prompt_text(problem, tokenizer, think)` writes the user message
        (experiments.tasks.gsm8k, .math500, .aime, .ceval).
    think: end the prompt by opening "<think>\\n" (True), never (False), or when the tokenizer has
        "<think>" as one token (None).
    """

    tokenizer_path: str
    task_module: str = "experiments.tasks.gsm8k"
    think: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer_path, (str, Path)) or not str(self.tokenizer_path):
            raise ValueError(f"ChatPrompt.tokenizer_path={self.tokenizer_path!r} must be a checkpoint folder")
        object.__setattr__(self, "tokenizer_path", str(self.tokenizer_path))
        if self.think is not None and not isinstance(self.think, bool):
            raise ValueError(f"ChatPrompt.think={self.think!r} must be true, false or null")
        task_prompt_fn(self.task_module)  # fails now, naming the module, rather than at the first problem

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_path)

    def __call__(self, problem: Problem) -> str:
        tokenizer = self.tokenizer
        text = task_prompt_fn(self.task_module)(problem, tokenizer, think=self.think)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and _path_adds_bos(self.tokenizer_path):
            text = text[len(bos):]  # the encoder adds it back: one BOS, as the template meant
        return text


def encoding_adds_bos(tokenizer: Any) -> bool:
    """True when encoding text with special tokens puts the BOS token first."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


@functools.lru_cache(maxsize=8)
def _path_adds_bos(tokenizer_path: str) -> bool:
    return encoding_adds_bos(load_tokenizer(tokenizer_path))
