"""The simulated world, its gold score and the simulated annotator (rlhf_jax.data.simulated)."""
import itertools
import math
import re

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.data.formats import parse_row
from rlhf_jax.data.simulated import (
    DEFAULT_TEMPERATURE,
    TOPICS,
    Annotator,
    Mix,
    best_response,
    binary_rows,
    gold_score,
    gold_scores,
    pairwise_rows,
    prompt_rows,
    ranked_rows,
    sft_rows,
    topic_of,
)
from rlhf_jax.data.simulated import gold, world

PROMPT = "Customer: I forgot my password.\nAgent:"
BEST = " I'm sorry about this, happy to help. I have sent a password reset link to your email. Let me know if you need anything else."
CONCISE = " I have sent a password reset link to your email."
MEDIOCRE = " Okay. Let me look into this for you."


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---- world -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", world.SPLITS)
def test_topic_is_recovered_from_every_sampled_prompt(split):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        prompt, topic = world.sample_prompt(rng, split)
        assert topic_of(prompt) is topic, prompt
        assert prompt.startswith("Customer: ") and prompt.endswith("\nAgent:")
        seen.add(world.customer_text(prompt))
    assert len(seen) > 1500  # slot values and greetings make prompts diverse


def test_eval_split_holds_out_greetings_closings_and_slot_values():
    assert len(TOPICS) >= 12 and all(len(topic.templates) >= 5 for topic in TOPICS)
    for table in (world._GREETINGS, world._CLOSINGS):
        assert not set(table["eval"]) & set(table["train"]) and "" not in table["eval"]
    for slot, values in world._SLOTS["eval"].items():
        assert not set(values) & set(world._SLOTS["train"][slot]), slot
    train = {r["prompt"] for r in prompt_rows(3000, seed=0, split="train")}
    held_out = [r["prompt"] for r in prompt_rows(1000, seed=0, split="eval")]
    assert not train & set(held_out)
    for prompt in held_out:  # every eval prompt opens and closes with text no train prompt has
        text = world.customer_text(prompt)
        assert text.startswith(world._GREETINGS["eval"]) and text.endswith(world._CLOSINGS["eval"])


def test_every_complaint_and_right_action_of_a_topic_share_its_key_word():
    for topic in TOPICS:
        for text in topic.templates + topic.actions:
            assert re.search(topic.cue, text.lower()), (topic.name, text)


def test_each_response_part_is_recognised_by_exactly_its_own_cue():
    signatures = {t.name: re.compile(t.signature) for t in TOPICS}
    cues = {"generic": gold.GENERIC_CUE, "offer": gold.OFFER_CUE, "rude": gold.RUDE_CUE, "irrelevant": gold.IRRELEVANT_CUE}
    parts = {"generic": world.GENERIC_ACTIONS, "offer": world.OFFERS, "rude": world.RUDE_REMARKS,
             "irrelevant": world.IRRELEVANT_REMARKS, None: world.EMPATHY_OPENERS + world.FLAT_OPENERS + world.FILLERS}
    parts.update({t.name: t.actions for t in TOPICS})
    for kind, texts in parts.items():
        for text in texts:
            lower = text.lower()
            assert [n for n, c in cues.items() if c.search(lower)] == ([kind] if kind in cues else []), text
            assert [n for n, s in signatures.items() if s.search(lower)] == ([kind] if kind in signatures else []), text


def test_mix_rejects_impossible_probabilities():
    with pytest.raises(ValueError, match="empathy"):
        Mix(empathy=1.5)
    with pytest.raises(ValueError, match="correct \\+ generic"):
        Mix(correct=0.8, generic=0.3)
    with pytest.raises(ValueError, match="split"):
        world.sample_prompt(np.random.default_rng(0), "test")


# ---- gold score ----------------------------------------------------------------------------------


def test_gold_orders_hand_written_responses_sensibly():
    g = lambda response: gold_score(PROMPT, response)  # noqa: E731
    wrong_action = " Okay. I have unlocked your account."
    rude = " Stop complaining. Let me look into this for you."
    irrelevant = " Let me look into this for you. Did you watch the football game last night?"
    praise_spam = " Great, wonderful, amazing, fantastic, excellent, lovely, perfect, brilliant!"
    verbose = CONCISE + " This note comes from our service desk. Our records are reviewed every month. Requests are handled in the order received."
    hedge = " " + " ".join(t.actions[0] for t in TOPICS)
    assert g(BEST) > g(CONCISE) > g(MEDIOCRE) > g(wrong_action)
    assert g(MEDIOCRE) > g(rude) and g(MEDIOCRE) > g(irrelevant)
    assert g(CONCISE) > g(praise_spam) and g(CONCISE) > g(verbose) and g(CONCISE) > g(hedge)
    assert g(BEST) > g(BEST + BEST) and g(BEST) > g(" " + " ".join([BEST.strip()] * 5))
    # praise beyond one polite sentence gains nothing: the politeness term is capped, so 8 words of
    # praise score as 7 words of thanks minus one word's length cost
    polite = " Thanks for your patience, glad to help."
    assert g(polite + CONCISE) == pytest.approx(g(praise_spam[:-1] + "." + CONCISE) + 0.08)
    for garbage in ["", "   ", " asdf qwer zxcv", " the the the the the the", " I have sent a pass", "\u00e9\u00e8 ??? !!!"]:
        assert math.isfinite(g(garbage)) and g(garbage) < g(MEDIOCRE), garbage
    # the right action depends on the prompt's topic
    assert gold_score("Customer: My account is locked.\nAgent:", wrong_action) > g(wrong_action)


def test_gold_matches_the_documented_formula():
    vader = SentimentIntensityAnalyzer().polarity_scores(BEST)["compound"]
    words = len(re.findall(r"[a-z0-9']+", BEST.lower()))
    expected = 1.5 * 1.0 + min(max(vader, -0.5), 0.6) / 0.6 + 1.0 - 0.08 * max(0, words - 12)
    assert gold_score(PROMPT, BEST) == pytest.approx(expected)
    # 6 words, 4 trigrams of which 1 repeats: repetition 1/4; no sentiment, action, offer or length term
    assert gold_score(PROMPT, " the cat sat the cat sat") == pytest.approx(-3.0 * 0.25)
    # a generic action earns 1/3 of the action weight; each other topic's action costs 2/3
    assert gold_score(PROMPT, " Our team will check this soon.") == pytest.approx(0.5)
    assert gold_score(PROMPT, " I have unlocked your account.") == pytest.approx(-1.0)
    # a prompt with no known topic earns no action term
    assert gold_score("Customer: Hello.\nAgent:", " I have unlocked your account.") == pytest.approx(0.0)


def test_gold_scores_is_the_batched_gold_score():
    rows = sft_rows(200, seed=1)
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    np.testing.assert_array_equal(gold_scores(prompts, responses), [gold_score(p, c) for p, c in zip(prompts, responses)])
    np.testing.assert_array_equal(gold_scores(prompts, responses), [r["meta"]["gold"] for r in rows])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_scores(prompts[:2], responses[:1])
    with pytest.raises(TypeError):
        gold_score(PROMPT, None)


def test_demonstrations_are_mediocre_and_each_part_moves_gold_the_documented_way():
    rows = sft_rows(4000, seed=2)
    g = np.array([r["meta"]["gold"] for r in rows])
    best = np.array([gold_score(r["prompt"], best_response(r["prompt"])) for r in rows[:300]])
    assert best.min() > g.max() - 0.5 and best.mean() - g.mean() > 2.0  # RLHF has room to improve on SFT
    for r in rows[:300]:
        assert gold_score(r["prompt"], best_response(r["prompt"])) >= r["meta"]["gold"] - 1e-9
    mean = lambda part, value: g[[r["meta"]["parts"][part] == value for r in rows]].mean()  # noqa: E731
    assert mean("opener", "empathy") > mean("opener", "flat") > mean("opener", "none") - 0.1
    assert mean("action", "correct") > mean("action", "generic") > mean("action", "wrong")
    assert mean("filler", "no") > mean("filler", "yes")
    assert mean("remark", "none") > mean("remark", "irrelevant") > mean("remark", "rude")
    assert mean("offer", "yes") > mean("offer", "no")
    shares = {p: np.mean([r["meta"]["parts"][p] == v for r in rows]) for p, v in
              [("opener", "empathy"), ("action", "correct"), ("offer", "yes"), ("filler", "yes")]}
    assert shares == pytest.approx({"opener": 0.35, "action": 0.5, "offer": 0.35, "filler": 0.35}, abs=0.03)


# ---- annotator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [DEFAULT_TEMPERATURE, 1.5])
def test_labels_agree_with_gold_at_the_rate_the_temperature_implies(temperature):
    annotator = Annotator(seed=7, temperature=temperature)
    rows = pairwise_rows(3000, seed=5, annotator=annotator)
    gap = np.array([r["meta"]["gold_chosen"] - r["meta"]["gold_rejected"] for r in rows])
    agreement = np.mean(np.where(gap == 0, 0.5, gap > 0))
    p = _sigmoid(np.abs(gap) / temperature)
    ceiling = annotator.agreement_ceiling([r["prompt"] for r in rows], [(r["chosen"], r["rejected"]) for r in rows])
    assert ceiling == pytest.approx(p.mean())
    assert abs(agreement - ceiling) < 4 * math.sqrt(np.sum(p * (1 - p))) / len(rows)
    if temperature == DEFAULT_TEMPERATURE:
        assert 0.85 < ceiling < 0.92


def test_compare_follows_bradley_terry_in_both_orders():
    annotator = Annotator(seed=0, temperature=1.0)
    p = _sigmoid(gold_score(PROMPT, CONCISE) - gold_score(PROMPT, MEDIOCRE))
    assert annotator.p_prefer(PROMPT, CONCISE, MEDIOCRE) == pytest.approx(p)
    n = 4000
    wins_first = np.mean([annotator.compare(PROMPT, CONCISE, MEDIOCRE) == 0 for _ in range(n)])
    wins_second = np.mean([annotator.compare(PROMPT, MEDIOCRE, CONCISE) == 1 for _ in range(n)])
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(wins_first - p) < tol and abs(wins_second - p) < tol


def test_rank_follows_plackett_luce():
    responses = [MEDIOCRE, CONCISE, BEST]
    utility = gold_scores([PROMPT] * 3, responses) / 2.0
    annotator = Annotator(seed=1, temperature=2.0)
    n = 6000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        order = tuple(annotator.rank(PROMPT, responses))
        counts[order] = counts.get(order, 0) + 1
    for order in itertools.permutations(range(3)):
        rest = list(order)
        prob = 1.0
        for i in order:  # Plackett–Luce: pick the next best among those left, by softmax
            prob *= math.exp(utility[i]) / sum(math.exp(utility[j]) for j in rest)
            rest.remove(i)
        assert abs(counts.get(order, 0) / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-3, order


def test_thumb_rate_and_rows_of_every_kind():
    annotator = Annotator(seed=2, temperature=0.5, threshold=1.0)
    p = _sigmoid((gold_score(PROMPT, CONCISE) - 1.0) / 0.5)
    n = 4000
    assert abs(np.mean([annotator.thumb(PROMPT, CONCISE) for _ in range(n)]) - p) < 4 * math.sqrt(p * (1 - p) / n)
    rows = {"sft": sft_rows(50, seed=3), "pairwise": pairwise_rows(50, seed=3),
            "ranked": ranked_rows(50, seed=3, k=3), "binary": binary_rows(50, seed=3), "prompt": prompt_rows(50, seed=3)}
    for kind, kind_rows in rows.items():
        for i, row in enumerate(kind_rows):
            parse_row(row, kind, f"<{kind}:{i}>")  # valid in the generic format (chosen != rejected, ...)
            assert row["meta"]["topic"] == topic_of(row["prompt"]).name and row["meta"]["split"] == "train"
    for row in rows["ranked"]:
        assert row["meta"]["gold"] == [gold_score(row["prompt"], r) for r in row["responses"]]
    labels = [r["label"] for r in binary_rows(2000, seed=4)]
    assert 0.4 < np.mean(labels) < 0.6  # the default threshold sits near the demonstrations' median


def test_rows_are_deterministic_in_the_seed():
    for build in (sft_rows, pairwise_rows, ranked_rows, binary_rows, prompt_rows):
        assert build(100, seed=11) == build(100, seed=11), build.__name__
        assert build(100, seed=11) != build(100, seed=12), build.__name__
    assert sft_rows(100, seed=11, split="eval") != sft_rows(100, seed=11)


def test_responses_from_a_user_sampler_are_annotated():
    best_and_mediocre = lambda prompts, k: [[best_response(p), MEDIOCRE][:k] for p in prompts]  # noqa: E731
    rows = pairwise_rows(200, seed=0, responses_from=best_and_mediocre)
    assert all({r["chosen"], r["rejected"]} == {best_response(r["prompt"]), MEDIOCRE} for r in rows)
    assert np.mean([r["chosen"] == MEDIOCRE for r in rows]) < 0.05  # best wins by > 1.9 gold at T = 0.4

    calls = []

    def stuck_once(prompts, k):  # identical on the first call, distinct after: resampled
        calls.append(len(prompts))
        return [[CONCISE] * k if len(calls) == 1 else [CONCISE, MEDIOCRE][:k] for _ in prompts]

    assert len(pairwise_rows(5, responses_from=stuck_once)) == 5 and calls == [5, 5]
    with pytest.raises(ValueError, match="repeated responses for 5 prompts"):
        pairwise_rows(5, responses_from=lambda prompts, k: [[CONCISE] * k for _ in prompts])
    with pytest.raises(ValueError, match="must return 2 responses"):
        pairwise_rows(5, responses_from=lambda prompts, k: [[CONCISE] for _ in prompts])
    with pytest.raises(ValueError, match="positive int"):
        pairwise_rows(0)
    with pytest.raises(ValueError, match="temperature"):
        Annotator(temperature=0.0)


def test_reference_numbers_command(capsys):
    from rlhf_jax.data.simulated.__main__ import main

    main(n=300)
    out = capsys.readouterr().out
    demo, best = map(float, re.match(r"demonstration gold (\S+) ± \S+; best achievable (\S+)", out).groups())
    assert demo + 2.0 < best
    assert 0.85 < float(re.search(r"agreement ceiling at temperature 0.4: (\S+)", out).group(1)) < 0.92
