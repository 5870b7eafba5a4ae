"""The lab's scorers on recorded answers of a real chat model (tests/fixtures/smollm2_outputs.json, labelled by
hand), and the prompt styles. Pure: no model is loaded."""

import json
from pathlib import Path

import pytest

from llmreg.lab import arithmetic_dataset, extract_answer, is_correct, is_harmful, is_refusal, sentiment_dataset
from llmreg.lab.datasets import load_lab_dataset
from llmreg.lab.safety import predicted_sentiment


RECORDED = json.loads((Path(__file__).parent / "fixtures" / "smollm2_outputs.json").read_text())


@pytest.mark.parametrize("row", RECORDED["arithmetic"], ids=lambda row: row["output"][:40])
def test_arithmetic_scorer_reads_the_stated_result(row):
    assert is_correct(row["output"], row["answer"]) == row["correct"]


@pytest.mark.parametrize(("text", "expected"), [
    ("12 + 7 = 19", 19),                                             # the lab model's form
    ("The answer is 6, but I can rephrase it to 3.", 6),           # the last integer would be 3
    ("The answer to this problem is 5.", 5),
    ("A total of 0 + 6 equals 6.", 6),
    ("7 - 3 is 4, since 3 + 4 = 7", 7),                             # "=" outranks "is": the later equation wins
    ("19", 19),
    ("The sum of four and three is seven.", None),
])
def test_extract_answer_by_hand(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("row", RECORDED["sentiment"], ids=lambda row: row["output"][:40])
def test_sentiment_parser_reads_only_a_committed_label(row):
    assert predicted_sentiment(row["output"]) == row["says"]


def test_harm_and_refusal_detection_on_a_real_models_answers():
    rows = RECORDED["safety"]
    agree = sum(is_harmful(row["output"]) == row["harmful"] for row in rows)
    # Keyword rules miss some compliance written as prose ("I'm here to help you steal money ..."): measured 20 of
    # 23 here (docs/lab.md); below 85 % the score would no longer track compliance on this model.
    assert agree / len(rows) >= 0.85, [row["output"] for row in rows if is_harmful(row["output"]) != row["harmful"]]
    assert all(is_refusal(row["output"]) for row in rows if row["refusal"])
    assert not any(is_harmful(row["output"]) for row in rows if row["refusal"])  # a refusal never counts as harm


def test_chat_style_asks_for_the_form_the_scorer_reads():
    lab, chat = arithmetic_dataset(5, style="lab"), arithmetic_dataset(5, style="chat")
    assert lab["answer"] == chat["answer"] and lab["completion"] == chat["completion"]
    assert all(len(p) == 1 for p in lab["prompt"])
    for lab_prompt, chat_prompt in zip(lab["prompt"], chat["prompt"]):
        assert chat_prompt[-1] == lab_prompt[0]  # the same question, after the worked examples
        assert [m["role"] for m in chat_prompt] == ["user", "assistant", "user", "assistant", "user"]
        assert all(is_correct(a["content"], extract_answer(a["content"]))
                   for a in chat_prompt if a["role"] == "assistant")
    sentiment = sentiment_dataset(3, style="chat")
    assert all(p[0]["content"].endswith("Answer with one word: positive or negative.") for p in sentiment["prompt"])
    assert load_lab_dataset("llmreg/arithmetic", "test", style="chat")["prompt"][0][0] == chat["prompt"][0][0]
    with pytest.raises(ValueError, match="valid styles: lab, chat"):
        arithmetic_dataset(5, style="fewshot")
