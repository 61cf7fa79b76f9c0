"""The chains task: line format, hop counting, disjoint splits, training rows, the character tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.common import UsageError, parse_int_list
from training.tasks import chains

LINE = re.compile(r"^[a-z]=(?:[0-9]|[a-z][+-][0-9])(?:;[a-z]=(?:[0-9]|[a-z][+-][0-9]))*(?:;\?[a-z]=[0-9])+\n$")


def solve(text: str) -> tuple[dict, dict]:
    """Values and hop counts of every variable of ``a=3;b=a+4;...``, computed from the text alone."""
    rhs = {}
    for a in text.split(";"):
        var, expr = a.split("=")
        assert var not in rhs, f"{var} assigned twice in {text}"
        rhs[var] = expr
    values, hops = {}, {}

    def walk(v):
        if v not in values:
            e = rhs[v]
            if e.isdigit():
                values[v], hops[v] = int(e), 1
            else:
                walk(e[0])
                d = int(e[2]) if e[1] == "+" else -int(e[2])
                values[v], hops[v] = (values[e[0]] + d) % 10, hops[e[0]] + 1
        return values[v]

    for v in rhs:
        walk(v)
    return values, hops


@pytest.mark.parametrize("hops", [1, 2, 3, 5, 8])
def test_lines_have_the_format_and_the_hop_count_asked_for(hops):
    for i in range(40):
        p = chains.make_problem(chains.rng_for("test", 0, i), hops)
        line = p.line()
        assert LINE.match(line), line
        values, hop_of = solve(p.text)
        assert hop_of[p.target] == hops and values == p.values and hop_of == p.hops
        assert line.endswith(f";?{p.target}={values[p.target]}\n")
        roots = [a for a in p.assignments if a[2:].isdigit()]  # one literal per chain
        assert 3 <= len(roots) <= 5  # the main chain and 2-4 distractors
        assert all(hop_of[v] <= hops for v in hop_of)


def test_prompt_is_the_line_up_to_the_answer():
    p = chains.make_problem(chains.rng_for("val", 3, 7), 4)
    assert p.line() == p.prompt() + str(p.values[p.target]) + "\n"


def test_splits_and_seeds_give_disjoint_problems():
    prompts = {s: {p.prompt() for p in chains.eval_problems(s, 0, 3, 300)} for s in chains.SPLIT_SEEDS}
    assert all(len(v) == 300 for v in prompts.values())
    assert not prompts["train"] & prompts["val"] and not prompts["val"] & prompts["test"] and not prompts["train"] & prompts["test"]
    assert chains.eval_problems("test", 0, 3, 5)[0].text == chains.eval_problems("test", 0, 3, 5)[0].text  # reproducible
    assert chains.eval_problems("test", 1, 3, 5)[0].text != chains.eval_problems("test", 0, 3, 5)[0].text
    with pytest.raises(ValueError, match="split must be one of"):
        chains.rng_for("dev", 0, 0)


@pytest.mark.parametrize("replace", [False, True])
def test_training_queries_put_the_deepest_first(replace):
    rng = np.random.default_rng(0)
    for _ in range(30):
        p = chains.make_problem(rng, 5)
        q = chains.training_queries(rng, p, 8, replace)
        depths = [p.hops[v] for v in q]
        assert p.target in q and depths == sorted(depths, reverse=True)
        # No query is written after one of its own dependencies' answers: dependencies have fewer hops.
        assert len(q) == (8 if replace else min(8, len(p.values)))
        if not replace:
            assert len(set(q)) == len(q)


def test_training_rows_label_only_answer_digits():
    rng = np.random.default_rng(1)
    ids, labels, answers = chains.training_row(rng, 4, 6)
    inv = {i: t for t, i in chains.VOCAB.items()}
    tokens = [inv[i] for i in ids]
    text = "".join(tokens)
    labelled = [i for i, t in enumerate(labels) if t != chains.IGNORE]
    assert labelled == [i for i, _ in answers] and len(answers) == 6
    label_hops = [h for _, h in answers]
    assert all(tokens[i].endswith("=") and tokens[i - 1] == "?" for i in labelled)  # the "x=" of each query predicts
    values, hops = solve(text.split(";?")[0])
    for i, h in zip(labelled, label_hops):
        var = tokens[i][0]
        assert labels[i] == chains.VOCAB[str(values[var])] and h == hops[var]


def test_assignment_labels_name_the_variable_each_assignment_defines():
    plain = chains.training_row(np.random.default_rng(2), 3, 5)
    ids, labels, answers = chains.training_row(np.random.default_rng(2), 3, 5, assignment_labels=True)
    assert ids == plain[0] and answers == plain[2]  # the same line and answers, more labels
    assert all(labels[i] == plain[1][i] for i, _ in answers)
    inv = {i: t for t, i in chains.VOCAB.items()}
    tokens = [inv[i] for i in ids]
    prompt_end = tokens.index("?")  # the ';' before it ends the last assignment
    key = None
    for i, t in enumerate(tokens[:prompt_end]):
        if t.endswith("="):
            key = t
            assert labels[i] == chains.IGNORE  # a key token predicts nothing
        elif t in "+-":
            assert inv[labels[i]] == tokens[i - 1] + "=", (i, tokens)  # the operator names its source's key
        else:
            assert inv[labels[i]] == key, (i, tokens)  # the digits, the source and the ending ';' name their key
    assert set(labels[prompt_end:]) - {chains.IGNORE} == {plain[1][i] for i, _ in answers}  # the query part: answers only


def test_max_offset_caps_the_chain_digits():
    for i in range(20):
        p = chains.make_problem(chains.rng_for("train", 0, i), 4, max_offset=0)
        assert all(a.endswith(("+0", "-0")) or a[2:].isdigit() for a in p.assignments)
        assert solve(p.text) == (p.values, p.hops)
    # The default draws what it always drew: problems are a pure function of (split, seed, index).
    assert chains.make_problem(chains.rng_for("test", 0, 3), 4).text == chains.make_problem(chains.rng_for("test", 0, 3), 4, max_offset=9).text


def test_zero_literals_keep_the_problem_and_zero_its_literals():
    for i in range(20):
        plain = chains.make_problem(chains.rng_for("train", 0, i), 4)
        zero = chains.make_problem(chains.rng_for("train", 0, i), 4, zero_literals=True)
        assert [a if len(a) == 5 else a[:2] + "0" for a in plain.assignments] == zero.assignments
        assert solve(zero.text) == (zero.values, zero.hops)


def test_character_tokenizer_matches_encode():
    tok = chains.char_tokenizer()
    line = "c=a+4;a=3;b=c-1;?b=6\n"
    assert tok(line, add_special_tokens=False)["input_ids"] == chains.encode(line)
    assert tok.decode(chains.encode(line)) == line
    assert tok("A", add_special_tokens=False)["input_ids"] == [chains.UNK_ID]  # unknown characters do not fail
    assert len(set(chains.VOCAB.values())) == len(chains.VOCAB) == len(chains.SPECIAL) + len(chains.ALPHABET) + 26
    assert [tok.decode([i]) for i in chains.encode("b=c-1")] == ["b=", "c", "-", "1"]  # a key and its '=' are one token


def test_ranges_and_lists():
    assert parse_int_list("1-3,6", "--hops") == [1, 2, 3, 6]
    assert parse_int_list("5", "--loops", 1, 6) == [5]
    with pytest.raises(UsageError, match="--loops 7 is outside"):
        parse_int_list("1-7", "--loops", 1, 6)
    with pytest.raises(UsageError, match="range '4-2' is empty"):
        parse_int_list("4-2", "--hops")
    with pytest.raises(UsageError, match="expects integers"):
        parse_int_list("one", "--hops")
