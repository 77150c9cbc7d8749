"""The tiny tokenizer: single tokens for separator / think tags / digits, lossless, save/load."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from experiments.tasks import arith
from policies.tiny_tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", [".\n\n", "<think>", "</think>", *"0123456789"])
def test_single_tokens(tok, text):
    assert len(ids(tok, text)) == 1
    assert tok.decode(ids(tok, text)) == text


def test_every_digit_is_its_own_token_inside_numbers(tok):
    pieces = tok.convert_ids_to_tokens(ids(tok, "Ann has 1234 coins.\n<think>12 + 345 = 357.\n\n"))
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("1234") + list("12") + list("345") + list("357")


def test_separator_and_tags_are_single_tokens_in_context(tok):
    text = "Q?\n<think>23 + 14 = 37.\n\n37 - 9 = 28.\n\n</think>Answer: 28"
    pieces = tok.convert_ids_to_tokens(ids(tok, text))
    assert pieces.count(".\n\n") == 2 and pieces.count("<think>") == 1 and pieces.count("</think>") == 1


def test_special_tokens_and_bos_post_processor(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    with_bos = tok("Ann has 3 coins.")["input_ids"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids(tok, "Ann has 3 coins.")


def test_skip_special_tokens_keeps_separator_and_think_tags(tok):
    text = "x<think>1 + 1 = 2.\n\n</think>Answer: 2"
    encoded = [tok.bos_token_id] + ids(tok, text) + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(encoded, skip_special_tokens=True) == text
    assert tok.decode(encoded) == "<bos>" + text + "<eos><pad>"


def test_lossless_round_trip_on_arith(tok):
    problems = arith.generate_problems("train", 400, seed=3) + arith.generate_problems("test", 100, seed=3)
    texts = [arith.prompt_text(p) + arith.solution_text(p) for p in problems]
    encoded = tok(texts, add_special_tokens=True)["input_ids"]
    assert [tok.decode(e, skip_special_tokens=True) for e in encoded] == texts


def test_prompts_are_compact(tok):
    # merges learned from the arith corpus make common words single tokens ("Ġcoins")
    problems = arith.generate_problems("test", 50, seed=0)
    lengths = [len(ids(tok, arith.prompt_text(p))) for p in problems]
    assert max(lengths) < 80
    assert len(ids(tok, " coins")) == 1


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_lossless_round_trip_on_any_text(tok, text):
    assert tok.decode(ids(tok, text)) == text


def test_deterministic_build_and_save_load(tok, tmp_path):
    again = build_tokenizer(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Mia has 12 beads.\n<think>12 * 3 = 36.\n\n</think>Answer: 36"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
    )


def test_small_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(vocab_size=100)


def test_the_command_refuses_a_file_as_its_folder_and_has_help(tmp_path, capsys):
    # a file was "saved to" with exit 0 and stayed empty; --help built a folder named "--help"
    from policies.tiny_tokenizer import main

    notes = tmp_path / "notes.txt"
    notes.write_text("")
    assert main([str(notes)]) == 2
    assert capsys.readouterr().err == f"error: {notes} is a file, not a folder for the tokenizer's files\n"
    assert notes.read_text() == ""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "OUT_DIR" in capsys.readouterr().out
    assert main([str(tmp_path / "tok")]) == 0 and (tmp_path / "tok" / "tokenizer.json").is_file()
