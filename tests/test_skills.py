import random

import pytest

from teacher_data import skills


def test_true_answers():
    assert skills.true_answer("upper", {"word": "abcd"}) == "ABCD"
    assert skills.true_answer("reverse", {"word": "abc"}) == "cba"
    assert skills.true_answer("sort", {"digits": "3091"}) == "0139"
    assert skills.true_answer("shift", {"word": "azy"}) == "baz"


def test_blind_spots_are_the_documented_ones():
    assert skills.blind_spot_answer("upper", {"word": "abcd"}) == "aBCD"  # first letter left as it was
    assert skills.blind_spot_answer("sort", {"digits": "3591"}) == "1395"  # last differing pair swapped
    assert skills.blind_spot_answer("sort", {"digits": "777"}) is None
    assert skills.blind_spot_answer("shift", {"word": "abc"}) == "bcc"  # last letter left as it was
    assert skills.blind_spot_answer("reverse", {"word": "abc"}) is None


def test_splits_never_share_a_problem():
    split_keys = {}
    for split in skills.SPLIT_BUCKETS:
        rows = skills.make_prompts(split, 300, seed=split == "sft")
        assert len(rows) == 1200 and len({r["prompt_id"] for r in rows}) == 1200
        split_keys[split] = {r["prompt_id"] for r in rows}
    assert not split_keys["heldout"] & split_keys["prefs"]
    assert not split_keys["heldout"] & split_keys["sft"]
    assert not split_keys["prefs"] & split_keys["sft"]


def test_same_seed_same_prompts_other_seed_other_prompts():
    assert skills.make_prompts("sft", 50, seed=1) == skills.make_prompts("sft", 50, seed=1)
    assert skills.make_prompts("sft", 50, seed=1) != skills.make_prompts("sft", 50, seed=2)


@pytest.mark.parametrize("error_rate", [0.0, 0.5, 1.0])
def test_teacher_errs_at_its_rate_and_only_in_blind_spots(error_rate):
    rng, wrong, applicable = random.Random(0), 0, 0
    for row in skills.make_prompts("sft", 400, seed=0):
        answer = skills.teacher_answer(row["messages"], error_rate, rng)
        verdict = skills.judge(row["messages"], answer)
        assert verdict.well_formatted
        skill, fields = skills.parse_problem(row["messages"][0]["content"])
        if skills.blind_spot_answer(skill, fields) is None:
            assert verdict.correct
        else:
            applicable += 1
            wrong += not verdict.correct
    assert abs(wrong / applicable - error_rate) < 0.05


def test_judge_scores_correctness_and_format():
    messages = [{"role": "user", "content": "sort 4021"}]
    assert skills.judge(messages, "Answer: 0124").score == 10
    assert skills.judge(messages, "it is 0124").score == 7
    assert skills.judge(messages, "Answer: 0142").score == 3
    assert skills.judge(messages, "").score == 0
    assert skills.judge([{"role": "user", "content": "Tell me a joke."}], "no").score is None
