"""LRA ListOps: the TSV reader, its one-hot token encoding, and an offline generator.

File format (Tay et al., LRA release ``listops-1000/``): a TSV with the header
``Source\\tTarget`` and one example per line, e.g.::

    [MAX 2 9 [MIN 4 7 ] 0 ]\\t9

The LRA release writes every operator application in a binary-bracketed form,
``( ( ( [MAX 2 ) 9 ) ] )``; the parentheses carry no information beyond the
``[OP … ]`` brackets, so the reader drops them (as the S4 and LRA pipelines do).

Encoding: 16 tokens, one-hot per step — index 0 padding, 1–10 the digits 0–9,
11–14 ``[MIN [MAX [MED [SM``, 15 ``]``. Sequences are padded at the START to
a common length: the model's class is read from the output of the LAST step,
so left padding makes that step the real end of every expression. Padding
steps carry the one-hot padding token (not an all-zero vector), as the
embedding-based LRA models see a padding token too.

Operators: MIN, MAX, MED (median; for an even count the mean of the two middle
values rounded down, i.e. ``int(np.median)``, as the LRA generator computes it)
and SM (sum modulo 10). Labels are the value 0–9 (10 classes).
"""

import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from elmcore.errors import DataError
from elmcore.storage.fileio import atomic_write_text
from elmcore.data.images import EncodedSequenceTask, one_hot, split_sizes

PAD = "<pad>"
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = (PAD,) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_INDEX = {tok: i for i, tok in enumerate(VOCAB)}
IGNORED_TOKENS = ("(", ")")
NUM_CLASSES = 10
HEADER = "Source\tTarget"

SPLIT_FILES = {"train": "basic_train.tsv", "valid": "basic_val.tsv", "test": "basic_test.tsv"}
SOURCE = ("the LRA release tarball lra_release.gz from https://github.com/google-research/"
          "long-range-arena (folder lra_release/listops-1000), or run "
          "`elm data generate listops --out DIR`")


# Token → index, with the LRA bracketing marked IGNORED and everything else UNKNOWN.
_IGNORED, _UNKNOWN = -2, -1
_LOOKUP = {**{tok: i for tok, i in TOKEN_INDEX.items() if tok != PAD}, **{t: _IGNORED for t in IGNORED_TOKENS}}


def _encode(source, path, number):
    codes = np.array([_LOOKUP.get(tok, _UNKNOWN) for tok in source.split()], dtype=np.int16)
    if (codes == _UNKNOWN).any():
        bad = source.split()[int(np.argmax(codes == _UNKNOWN))]
        raise DataError(f"{path} line {number}: unknown token {bad!r}")
    codes = codes[codes != _IGNORED]
    if not len(codes):
        raise DataError(f"{path} line {number}: empty Source")
    return codes.astype(np.uint8)


def read_listops_tsv(path):
    """Read one ListOps TSV.

    Returns
    -------
    sequences : list of (L_i,) uint8 arrays of token indices (parentheses dropped)
    labels : (N,) int64 array of targets 0–9
    """
    sequences, labels = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            header = f.readline().rstrip("\r\n")
            if header.strip() != HEADER:
                got = header[:60] if header else "an empty file"
                raise DataError(f"{path}: first line must be the header 'Source<TAB>Target', got {got!r}")
            for number, line in enumerate(f, start=2):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    raise DataError(f"{path} line {number}: expected 2 tab-separated fields, "
                                    f"got {len(fields)}")
                source, target = fields
                try:
                    label = int(target)
                except ValueError:
                    raise DataError(f"{path} line {number}: Target {target!r} is not an integer") from None
                if not 0 <= label < NUM_CLASSES:
                    raise DataError(f"{path} line {number}: Target {label} outside 0..9")
                sequences.append(_encode(source, path, number))
                labels.append(label)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read ListOps file {path}: {e}") from None
    return sequences, np.asarray(labels, dtype=np.int64)


def pad_left(sequences, length, path="ListOps data"):
    """Stack token sequences into (N, length) uint8, padding at the start with the PAD index."""
    out = np.full((len(sequences), length), TOKEN_INDEX[PAD], dtype=np.uint8)
    for i, seq in enumerate(sequences):
        if len(seq) > length:
            raise DataError(f"{path}: example {i} has {len(seq)} tokens, more than "
                            f"max_length={length}")
        out[i, length - len(seq):] = seq
    return out


class ListOpsTask(EncodedSequenceTask):
    """ListOps from ``basic_train.tsv`` / ``basic_val.tsv`` / ``basic_test.tsv`` in ``data_dir``.

    Parameters
    ----------
    data_dir : str
    max_length : int, optional
        Padded sequence length T; default the longest sequence over all three
        files. A longer sequence is an error (truncating would change its value).
    """

    name = "listops"
    num_input = len(VOCAB)
    num_output = NUM_CLASSES

    def __init__(self, data_dir, max_length: Optional[int] = None):
        super().__init__()
        data_dir = os.fspath(data_dir)
        missing = [f for f in SPLIT_FILES.values() if not os.path.isfile(os.path.join(data_dir, f))]
        if missing:
            raise DataError(f"ListOps files missing in {data_dir}: {', '.join(missing)}. "
                            f"Get them from {SOURCE}")
        read = {split: read_listops_tsv(os.path.join(data_dir, f)) for split, f in SPLIT_FILES.items()}
        longest = max((len(s) for seqs, _ in read.values() for s in seqs), default=0)
        if max_length is not None and int(max_length) < 1:
            raise DataError(f"max_length must be positive, got {max_length}")
        self.seq_len = int(max_length) if max_length is not None else longest
        self._codes = {}
        for split, (seqs, labels) in read.items():
            self._codes[split] = pad_left(seqs, self.seq_len, os.path.join(data_dir, SPLIT_FILES[split]))
            self.labels[split] = labels

    def inputs(self, split, indices):
        return one_hot(self._codes[split][indices], self.num_input)

    def preview_figure(self, plt, split):
        """One example's one-hot tokens (token × step), the left padding shaded, the label in the title."""
        import numpy as np
        from matplotlib.colors import ListedColormap

        from elmcore.reporting.plotting import first_example
        x, label = first_example(self, split)
        codes = x.argmax(axis=1)
        pad = int(np.argmax(codes != VOCAB.index(PAD))) if (codes != VOCAB.index(PAD)).any() else len(codes)
        fig, (ax_text, ax) = plt.subplots(2, 1, figsize=(11, 5.2), gridspec_kw={"height_ratios": [1, 4]})
        ax.imshow(x.T, aspect="auto", interpolation="nearest", cmap=ListedColormap(["white", "black"]),
                  origin="lower", extent=(-0.5, len(x) - 0.5, -0.5, x.shape[1] - 0.5))
        if pad:
            ax.axvspan(-0.5, pad - 0.5, color="C0", alpha=0.15, label=f"padding ({pad} steps, token {PAD})")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_yticks(range(len(VOCAB)))
        ax.set_yticklabels(VOCAB, fontsize=7)
        ax.set_xlabel("step (the class is read from the last one)")
        ax.set_ylabel("token (one-hot input)")
        words = [VOCAB[c] for c in codes[pad:]]
        text = " ".join(words)
        ax_text.axis("off")
        ax_text.text(0, 0.5, text if len(text) <= 160 else text[:157] + "...", family="monospace", fontsize=8,
                     va="center", wrap=True)
        fig.suptitle(f"listops ({split}, example 0): {len(words)} tokens, label {int(label)}")
        return fig


# ---- generator -------------------------------------------------------------------------

# Below max_depth a node is an operator with this probability and a digit leaf
# otherwise: the LRA generator draws r ~ U(0, 1) and makes a leaf when r > VALUE_P = 0.25.
OPERATOR_PROBABILITY = 0.25
# Trees are grown, printed and evaluated recursively: stay far below Python's recursion limit.
MAX_DEPTH_LIMIT = 100


class _TooLong(Exception):
    """Raised inside tree growth once a tree passes max_length tokens (it would be rejected)."""


def _grow(rng, depth, max_depth, max_args, budget):
    """Random ListOps tree: an int leaf or ``(operator, [children])``; ``budget[0]`` counts tokens."""
    if depth >= max_depth or rng.random() >= OPERATOR_PROBABILITY:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLong
        return int(rng.integers(10))
    budget[0] -= 2  # the operator token and its closing bracket
    if budget[0] < 0:
        raise _TooLong
    num_args = int(rng.integers(2, max_args + 1))
    children = [_grow(rng, depth + 1, max_depth, max_args, budget) for _ in range(num_args)]
    return OPERATORS[int(rng.integers(len(OPERATORS)))], children


def evaluate_tree(tree):
    """Value 0–9 of a tree made by :func:`_grow`."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate_tree(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def tree_tokens(tree, parens=False):
    """Source string of a tree, plain (``[MAX 2 9 ]``) or in the LRA release's bracketed form."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    if not parens:
        return " ".join([op] + [tree_tokens(c) for c in children] + [END])
    text = op
    for child in children:
        text = f"( {text} {tree_tokens(child, True)} )"
    return f"( {text} {END} )"


def random_expression(rng, min_length, max_length, max_depth, max_args):
    """Draw trees until one has between min_length and max_length tokens; return (tree, length)."""
    while True:
        budget = [max_length]
        try:
            tree = _grow(rng, 1, max_depth, max_args, budget)
        except _TooLong:
            continue
        length = max_length - budget[0]
        if length >= min_length:
            return tree, length


def generate_listops(out_dir, n=1000, seed=0, min_length=500, max_length=2000, max_depth=10,
                     max_args=10, balanced=True, parens=False, valid_fraction=0.1, test_fraction=0.1,
                     progress=False):
    """Write ``basic_train.tsv`` / ``basic_val.tsv`` / ``basic_test.tsv`` into ``out_dir``.

    The grammar is the LRA generator's: below ``max_depth`` a node is an
    operator with probability 0.25 (uniform over MIN, MAX, MED, SM, with
    2..``max_args`` arguments), otherwise a digit leaf; trees are redrawn until their token
    count (digits, operators and closing brackets) lies in
    [``min_length``, ``max_length``]. The LRA defaults are 500–2000 tokens,
    depth 10, 10 arguments.

    Label balance: with ``balanced=True`` (default) every split holds each of
    the 10 classes ``n_split // 10`` or ``n_split // 10 + 1`` times (trees of a
    class already full are redrawn). With ``balanced=False`` the labels follow
    the grammar, as in LRA, which is skewed (MIN favours 0, MAX favours 9).

    ``n`` counts all examples; ``valid_fraction`` and ``test_fraction`` of them
    (at least one each) go to the validation and test files. Deterministic by
    ``seed``. Returns the paths written.
    """
    if not 1 <= min_length <= max_length:
        raise DataError(f"ListOps lengths must satisfy 1 <= min_length <= max_length, got "
                        f"{min_length}, {max_length}")
    if max_args < 2 or not 1 <= max_depth <= MAX_DEPTH_LIMIT:
        raise DataError(f"ListOps needs max_args >= 2 and 1 <= max_depth <= {MAX_DEPTH_LIMIT}, got "
                        f"{max_args}, {max_depth}")
    longest_possible = 1
    for _ in range(max_depth - 1):  # a full tree: every node above max_depth has max_args children
        longest_possible = 2 + max_args * longest_possible
    if min_length > longest_possible:
        raise DataError(f"no ListOps expression reaches min_length={min_length} with max_depth={max_depth}"
                        f" and max_args={max_args} (at most {longest_possible} tokens)")
    counts = split_sizes(n, valid_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    paths = []
    bar = tqdm(total=n, desc="listops", unit="expr", disable=not progress)
    for split, size in counts.items():
        quota = np.full(NUM_CLASSES, size // NUM_CLASSES) + (np.arange(NUM_CLASSES) < size % NUM_CLASSES)
        lines = [HEADER]
        while len(lines) <= size:
            tree, _ = random_expression(rng, min_length, max_length, max_depth, max_args)
            value = evaluate_tree(tree)
            if balanced:
                if quota[value] == 0:
                    continue
                quota[value] -= 1
            lines.append(f"{tree_tokens(tree, parens)}\t{value}")
            bar.update(1)
        path = os.path.join(os.fspath(out_dir), SPLIT_FILES[split])
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    bar.close()
    return paths
