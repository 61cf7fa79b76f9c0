"""Variable-chain problems: follow a chain of assignments to the queried variable's value.

One problem per line, assignments joined by ``;`` in shuffled order, then the query and its
answer digit::

    c=a+4;a=3;b=c-1;?b=6

Each variable is a single lowercase letter assigned once, as ``x=D``, ``x=y+D`` or ``x=y-D``
(D a digit, arithmetic mod 10). The hop count of a variable is the length of its dependency
chain (a literal is 1 hop; ``x=y+D`` is one more than y). A problem is one chain of ``hops``
variables (the queried one is its end) plus 2-4 distractor chains of 1..hops variables.

Training lines ask several queries after one assignment set (``...;?b=6;?c=0;?a=3``, see
`training_queries`); evaluation asks one. Problems are pure functions of (seed, index), so train,
validation and test sets from different seeds never share a random stream.
"""

from __future__ import annotations

import dataclasses
import re
import string

import numpy as np

LETTERS = string.ascii_lowercase
ALPHABET = "\n;=+-?" + string.digits + LETTERS  # every character a chains line can hold
MAX_HOPS = len(LETTERS) - 2 * 1  # the chain plus 2 one-variable distractors must fit in 26 letters
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # base seeds; a split's stream is (base, seed, index)


@dataclasses.dataclass
class Problem:
    assignments: list[str]  # in the order they are written, e.g. ["c=a+4", "a=3", "b=c-1"]
    values: dict[str, int]  # every variable's value
    hops: dict[str, int]  # every variable's hop count
    target: str  # the end of the main chain: the variable an evaluation asks for

    @property
    def text(self) -> str:
        return ";".join(self.assignments)

    def prompt(self, var: str | None = None) -> str:
        """The line up to the answer: ``assignments;?x=``."""
        return f"{self.text};?{var or self.target}="

    def line(self, queries: list[str] | None = None) -> str:
        """The full line with answers, one query (the target) unless ``queries`` are given."""
        asked = "".join(f";?{v}={self.values[v]}" for v in (queries or [self.target]))
        return f"{self.text}{asked}\n"


def rng_for(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SPLIT_SEEDS[split], seed, index, 0xC4A1])))


def make_problem(
    rng: np.random.Generator, hops: int, distractors: tuple[int, int] = (2, 4), max_offset: int = 9, *, zero_literals: bool = False
) -> Problem:
    """One problem whose target has exactly ``hops`` hops, with 2-4 distractor chains. ``max_offset``
    below 9 caps the D of ``x=y+D`` / ``x=y-D`` (a training curriculum: 0 makes every chain a copy).
    ``zero_literals`` writes every literal as 0 (the same draws, so the rest of the problem is
    unchanged): an answer is then the signed sum of its chain's offsets, the arithmetic without the
    lookup of a start value (a training row kind, docs/DEPTH.md section 4b)."""
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be in [1, {MAX_HOPS}], got {hops}")
    n_dis = int(rng.integers(distractors[0], distractors[1] + 1))
    lengths = [hops] + [int(rng.integers(1, hops + 1)) for _ in range(n_dis)]
    while sum(lengths) > len(LETTERS):  # shorten the longest distractor until all fit in 26 letters
        i = 1 + int(np.argmax(lengths[1:]))
        lengths[i] -= 1
    names = iter(rng.permutation(list(LETTERS)).tolist())
    assignments, values, hop_of = [], {}, {}
    target = None
    for n in lengths:
        prev = None
        for depth in range(1, n + 1):
            var, digit = next(names), int(rng.integers(0, 10 if prev is None else max_offset + 1))
            if prev is None:
                digit = 0 if zero_literals else digit
                assignments.append(f"{var}={digit}")
                values[var] = digit
            else:
                sign = "+" if rng.random() < 0.5 else "-"
                assignments.append(f"{var}={prev}{sign}{digit}")
                values[var] = (values[prev] + (digit if sign == "+" else -digit)) % 10
            hop_of[var], prev = depth, var
        target = target or prev  # the first chain is the main one
    order = rng.permutation(len(assignments))
    return Problem([assignments[i] for i in order], values, hop_of, target)


def training_queries(rng: np.random.Generator, problem: Problem, n: int, replace: bool = False) -> list[str]:
    """The target and n - 1 other variables (at most all of them unless ``replace``), deepest first
    with ties in random order.

    Deepest first: a dependency has fewer hops, so its answer is never written before a query that
    could use it as a shortcut. Without replacement the last answers of a line of literals can be
    guessed by elimination (the digits not answered yet); with replacement a repeated variable can
    copy its earlier answer."""
    others = [v for v in problem.values if v != problem.target]
    if replace:
        extra = [others[i] for i in rng.integers(0, len(others), size=max(0, n - 1))] if others else []
    else:
        extra = [others[i] for i in rng.permutation(len(others))[: max(0, n - 1)]]
    picked = [problem.target] + extra
    tie = {v: float(rng.random()) for v in picked}
    return sorted(picked, key=lambda v: (-problem.hops[v], tie[v]))


def eval_problems(split: str, seed: int, hops: int, n: int, max_offset: int = 9) -> list[Problem]:
    """n held-out problems of exactly ``hops`` hops (the same ones for the same arguments; ``max_offset``
    0 gives copy chains)."""
    return [make_problem(rng_for(split, seed * 1000 + hops, i), hops, max_offset=max_offset) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Tokens: one per character, except that a letter and the '=' after it ("b=") are one token. Then a
# value sits right after its key, in an assignment (``b=``, ``6``) as after a query (``?``, ``b=``,
# ``6``), and a lookup is the plain induction-head pattern (find the earlier key, copy what follows)
# instead of matching a letter two positions back, which models here learned far more slowly.
# Ids 0-2 are <|endoftext|>, <|padding|>, <|unk|>.
# ---------------------------------------------------------------------------------------------
SPECIAL = ("<|endoftext|>", "<|padding|>", "<|unk|>")
EOS_ID, PAD_ID, UNK_ID = 0, 1, 2
TOKENS = list(ALPHABET) + [f"{c}=" for c in LETTERS]
VOCAB = {**{s: i for i, s in enumerate(SPECIAL)}, **{t: len(SPECIAL) + i for i, t in enumerate(TOKENS)}}
PIECE = re.compile(r"[a-z]=|[\s\S]")  # the tokenizer's split, longest match first
IGNORE = -100  # label of a position the loss skips


def encode(text: str) -> list[int]:
    return [VOCAB.get(t, UNK_ID) for t in PIECE.findall(text)]


def char_tokenizer():
    """The same ids as ``encode`` as a Hugging Face tokenizer (no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=SPECIAL[UNK_ID]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL[EOS_ID], eos_token=SPECIAL[EOS_ID], pad_token=SPECIAL[PAD_ID], unk_token=SPECIAL[UNK_ID]
    )


def training_row(
    rng: np.random.Generator, hops: int, n_queries: int, replace: bool = False, assignment_labels: bool = False, max_offset: int = 9,
    *, zero_literals: bool = False,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(input ids, labels, [(position, hop count)] of each answer) of one training line.

    Answer digits are labelled at the ``x=`` token of each query, which predicts the digit after it.
    With ``assignment_labels`` the other tokens of each assignment, and the ``;`` that ends it, are
    also labelled: with the ``x=`` token of the variable the assignment defines, except the operator,
    which names its source's key (``b=c-1;``: ``c``, ``1`` and ``;`` predict ``b=``, ``-`` predicts
    ``c=``). These are auxiliary targets, not text: they hand the model the "which assignment am I
    in" and "which variable does it read" features a lookup matches against (an induction head's
    previous-token step), which without them sat on a plateau for every run here (docs/DEPTH.md).
    Evaluation reads only the last position of a prompt, which these labels never touch.
    ``max_offset`` and ``zero_literals`` are `make_problem`'s."""
    problem = make_problem(rng, hops, max_offset=max_offset, zero_literals=zero_literals)
    ids: list[int] = []
    aux: list[int] = []  # per input position: the label it gets with assignment_labels (IGNORE: none)
    for j, assignment in enumerate(problem.assignments):
        if j:
            ids.append(VOCAB[";"])
            aux.append(aux_key)  # the ';' ends the previous assignment
        toks = encode(assignment)
        aux_key = toks[0]  # the x= token of the variable defined here
        aux += [IGNORE] + [aux_key] * (len(toks) - 1)
        if len(toks) == 4:  # x=y+D: the operator names the source's key
            aux[-2] = VOCAB[assignment[2] + "="]
        ids += toks
    answers = []
    for k, v in enumerate(training_queries(rng, problem, n_queries, replace)):
        q = encode(f";?{v}=")
        aux += [aux_key if k == 0 else IGNORE] + [IGNORE] * (len(q) - 1)  # the first ';' ends the last assignment
        ids += q
        answers.append((len(ids) - 1, problem.hops[v]))
        ids += encode(str(problem.values[v]))
        aux.append(IGNORE)
    labels = list(aux[: len(ids) - 1]) if assignment_labels else [IGNORE] * (len(ids) - 1)
    for a, _ in answers:
        labels[a] = ids[a + 1]
    return ids[:-1], labels, answers
