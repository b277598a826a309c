"""Character-level language modelling: ``enwik8`` and any local ``text`` file, bytes as tokens.

Each example is a window of ``length`` consecutive bytes; the target at every
step is the next byte (loss ``cross_entropy_all`` in nats per character, metric bits
per character = loss / ln 2, lower is better). Every window starts from the model's
zero state, unless the task is **stateful** (option ``stateful=true``, truncated
BPTT as recurrent character models are trained on enwik8): then batch row b reads
the b-th contiguous 1/B of the split as one stream, successive batches are the
stream's successive windows, and the trainer starts each window from the state the
row's previous window ended in (a constant: no gradient crosses the boundary).
Evaluation of a stateful task runs the whole split the same way, every byte scored
once, in ``batch_size`` streams or fewer: each stream at least ``EVAL_STREAM_WINDOWS``
windows long, so that the cold start of a stream weighs little (a 1000-byte split
with length 32 makes 3 streams, enwik8's 5 MB 64).

Encoding: **one-hot**, one input channel per vocabulary symbol, given to the
model as one byte per value (uint8). A learned embedding would add a layer in
front of the synapses and a second input path to the engine; one-hot keeps the
engine unchanged, and the routing kernels read uint8 input directly, so the
256-wide input costs one byte per value to build and move. It also matches what
the network's synapses are: each synapse reads one input channel, i.e. one
byte value. Vocabularies (option ``vocab``):

* ``bytes``: all 256 byte values (the default for ``enwik8``, so bits per
  character are comparable with published figures);
* ``corpus``: only the byte values present in the file, in increasing order
  (the default for ``text``: a small corpus then gives a small model).

The vocabulary (which byte each channel stands for, elmcore.data.vocab) is stored with
the model and the run, so ``elm predict`` and ``elm sample`` encode and decode text.

Splits are by position: train, then valid, then test. enwik8 uses the usual
90,000,000 / 5,000,000 / 5,000,000 bytes; a ``text`` file 90 / 5 / 5 %.
Training windows (``shuffle`` with an ``rng``) start at offsets drawn uniformly
from the train split; without an ``rng``, and for evaluation, the split is cut
into consecutive non-overlapping windows in order. Either way an epoch has
⌊(bytes − 1) / length⌋ windows (stateful: B streams of ⌊(bytes − 1) / B⌋ bytes,
⌊stream / length⌋ batches).

Files are never loaded into float arrays: a plain file is memory-mapped and only
the bytes of the current batch are read; a zip member (``enwik8.zip``) is
decompressed once into a uint8 buffer (100 MB for enwik8).

``generate_text`` writes a corpus from a small word-level Markov source whose
entropy rate is known exactly, so the pipeline (and its tests) run offline; the rate
goes into ``corpus.json`` beside the corpus, and the task reports it as the floor
no model can beat.
"""

import json
import math
import os
import zipfile
from typing import Optional

import numpy as np

from elmcore.errors import DataError, ELMError
from elmcore.storage.fileio import atomic_output, atomic_write_text, parse_json
from elmcore.data.base import MANIFEST, SPLITS, Batch, Task
from elmcore.data.vocab import Vocabulary

ENWIK8_NAME = "enwik8"
ENWIK8_SIZE = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
ENWIK8_SOURCE = ("http://mattmahoney.net/dc/enwik8.zip (the first 10^8 bytes of the English "
                 "Wikipedia XML dump of 3 March 2006, Hutter Prize)")
TEXT_FRACTIONS = (0.90, 0.05, 0.05)
VOCABS = ("bytes", "corpus")
DEFAULT_LENGTH = 256
# Stateful evaluation: streams at least this many windows long (fewer streams than the batch size if need be).
EVAL_STREAM_WINDOWS = 8
# A zip member is decompressed into memory: refuse anything claiming more than this.
MAX_ZIP_MEMBER_BYTES = 1 << 30
_COUNT_CHUNK = 1 << 22  # bytes per chunk when counting (bincount works on intp copies)
GENERATED_NAME = "corpus.txt"
# The generator's vocabulary: its transition matrix and set-up loops grow with the square of it.
MAX_WORDS = 4096
# Memory the generator holds per character while it builds a text (measured: about 13).
BYTES_PER_GENERATED_CHAR = 16
# Beside a generated corpus: how it was made and its entropy rate (bits per character).
GENERATED_INFO = "corpus.json"


# ---- reading bytes -------------------------------------------------------------------------

def _read_zip_member(path, expected_size=None, member_name=None):
    """The bytes of the single (or the named) file in zip ``path`` as a uint8 array."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if member_name is not None:
                named = [m for m in members if os.path.basename(m.filename) == member_name]
                members = named or members
            if len(members) != 1:
                raise DataError(f"{path}: expected one file inside the zip"
                                f"{f' named {member_name}' if member_name else ''}, found "
                                f"{len(members)}")
            member = members[0]
            limit = MAX_ZIP_MEMBER_BYTES if expected_size is None else expected_size
            if member.file_size > limit:
                raise DataError(f"{path}: {member.filename} would unpack to {member.file_size:,} bytes"
                                f"{'' if expected_size is None else f', not {expected_size:,}'} "
                                f"(at most {limit:,} are read from a zip)")
            with archive.open(member) as f:
                # One byte past the declared size: a header that lies is caught, not trusted.
                data = f.read(member.file_size + 1)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError,
            NotImplementedError, ValueError) as e:
        raise DataError(f"cannot read zip file {path}: {e}") from None
    if len(data) != member.file_size:
        raise DataError(f"{path}: {member.filename} holds {len(data):,} bytes but its header says "
                        f"{member.file_size:,} (corrupt zip)")
    return np.frombuffer(data, dtype=np.uint8)


def read_bytes(path, expected_size=None, what="text file"):
    """uint8 view of a byte file (memory-mapped) or of the one file inside a zip (in memory)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    # By name or by magic: a damaged zip must fail, not be read as a byte corpus.
    if path.lower().endswith(".zip") or head == b"PK\x03\x04" or zipfile.is_zipfile(path):
        data = _read_zip_member(path, expected_size,
                                ENWIK8_NAME if expected_size == ENWIK8_SIZE else None)
    else:
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"{what} {path} is empty")
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {what} {path}: {e}") from None
    if expected_size is not None and len(data) != expected_size:
        raise DataError(f"{path} has {len(data):,} bytes; the standard {ENWIK8_NAME} file has exactly "
                        f"{expected_size:,} (get it from {ENWIK8_SOURCE})")
    return data


def byte_counts(data, start=0, stop=None):
    """Occurrences of each byte value 0..255 in ``data[start:stop]``, read in chunks."""
    stop = len(data) if stop is None else stop
    counts = np.zeros(256, np.int64)
    for lo in range(start, stop, _COUNT_CHUNK):
        counts += np.bincount(np.asarray(data[lo:min(lo + _COUNT_CHUNK, stop)]), minlength=256)
    return counts


def entropy_bits(counts):
    """Entropy in bits of the distribution proportional to ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if len(p) else 0.0


# ---- the task --------------------------------------------------------------------------------

class ByteLMTask(Task):
    """Next-byte prediction over fixed-length windows of one byte sequence.

    Parameters
    ----------
    data : uint8 array (a memmap or a buffer) of the whole corpus.
    bounds : {split: (start, stop)} byte ranges of the splits.
    length : steps per window (T); targets are the next byte at every step.
    vocab : ``bytes`` (256 symbols) or ``corpus`` (the byte values present in ``data``).
    stateful : batches are contiguous streams, one per batch row (see the module docstring).
    entropy_rate : bits per character of the source that generated ``data``, when known.
    """

    loss = "cross_entropy_all"
    metric = "bpc"
    higher_is_better = False
    loss_unit = "nats/char"
    metric_unit = "bits/char"

    def __init__(self, name, data, bounds, length=DEFAULT_LENGTH, vocab="bytes", source="", stateful=False,
                 entropy_rate=None):
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ELMError(f"{name}: length must be an integer >= 1, got {length!r}")
        if vocab not in VOCABS:
            raise ELMError(f"{name}: vocab must be one of {', '.join(VOCABS)}, got {vocab!r}")
        if not isinstance(stateful, (bool, np.bool_)):
            raise ELMError(f"{name}: stateful must be true or false, got {stateful!r}")
        self.name, self.data, self.source = name, data, source
        self.length, self.vocab, self.stateful = int(length), vocab, bool(stateful)
        self.entropy_rate = entropy_rate
        self.bounds = {s: (int(a), int(b)) for s, (a, b) in bounds.items()}
        for split, (lo, hi) in self.bounds.items():
            if hi - lo < self.length + 1:
                raise DataError(f"{name}: the {split} split of {source or 'the corpus'} has {hi - lo:,} "
                                f"bytes, fewer than one window needs (length + 1 = {self.length + 1}); "
                                f"use a larger file or a smaller length")
        if vocab == "bytes":
            self.symbols = np.arange(256, dtype=np.uint8)
        else:
            self.symbols = np.nonzero(byte_counts(data))[0].astype(np.uint8)
            if len(self.symbols) < 2:
                raise DataError(f"{name}: {source or 'the corpus'} holds a single byte value; "
                                "there is nothing to predict")
        self.vocabulary = Vocabulary(self.symbols)
        # byte value -> token index (every byte of the file is in the vocabulary by construction)
        self.index_of = self.vocabulary.index_of
        self.num_input = self.num_output = int(len(self.symbols))
        self._unigram = {}

    # ---- sizes -----------------------------------------------------------------------------
    def split_bytes(self, split):
        lo, hi = self.bounds.get(split, (0, 0))
        return hi - lo

    def num_examples(self, split):
        n = self.split_bytes(split)
        return (n - 1) // self.length if n > self.length else 0

    def count_unit(self, split):
        return f"windows of {self.length} bytes"

    def num_batches(self, split, batch_size):
        if not self.stateful:
            return super().num_batches(split, batch_size)
        return self.stream_bytes(split, batch_size) // self.length

    # ---- streams (stateful) -----------------------------------------------------------------
    def stream_bytes(self, split, rows):
        """Bytes each of ``rows`` contiguous streams of ``split`` holds (the last ``(bytes − 1) mod rows`` unread)."""
        return max(self.split_bytes(split) - 1, 0) // rows

    def stream_starts(self, split, rows):
        """Absolute offsets where the ``rows`` streams of ``split`` begin: row b reads the b-th 1/rows."""
        return self.bounds[split][0] + self.stream_bytes(split, rows) * np.arange(rows, dtype=np.int64)

    # ---- batches ---------------------------------------------------------------------------
    def window_starts(self, split, rng: Optional[np.random.Generator] = None, shuffle=False):
        """Absolute start offsets of one epoch's windows of ``split``."""
        lo, hi = self.bounds[split]
        count = self.num_examples(split)
        if shuffle and rng is not None:
            # Any start whose window and its next-byte target stay inside the split.
            return lo + rng.integers(0, hi - lo - self.length, size=count)
        return lo + self.length * np.arange(count, dtype=np.int64)

    def tokens(self, starts, length=None):
        """(B, length + 1) int64 token indices of the windows at ``starts`` (the only bytes read)."""
        length = self.length if length is None else length
        offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length + 1)
        return self.index_of[np.asarray(self.data[offsets])]

    def encode(self, tokens):
        """(B, T) token indices -> (B, T, V) uint8 one-hot."""
        return self.vocabulary.one_hot(tokens)

    def batches(self, split, batch_size, rng: Optional[np.random.Generator] = None, shuffle=False):
        """(B, length, V) uint8 one-hot inputs and (B, length) int64 next-token targets."""
        if split not in SPLITS:
            raise ELMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ELMError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if split not in self.bounds:
            return
        if self.stateful:
            yield from self._stream_batches(split, batch_size)
            return
        starts = self.window_starts(split, rng, shuffle)
        for i in range(0, len(starts), batch_size):
            tok = self.tokens(starts[i:i + batch_size])
            yield Batch(self.encode(tok[:, :-1]), tok[:, 1:])

    def _stream_batches(self, split, rows):
        """Stateful: batch w holds window w of every row's stream (its order is the stream's, never drawn)."""
        windows = self.num_batches(split, rows)
        if windows < 1:
            raise DataError(f"{self.name}: the {split} split's {self.split_bytes(split):,} bytes make {rows} "
                            f"streams of {self.stream_bytes(split, rows):,} bytes, shorter than one window "
                            f"(length {self.length} + 1); use a smaller batch size or length")
        starts = self.stream_starts(split, rows)
        for w in range(windows):
            tok = self.tokens(starts + w * self.length)
            yield Batch(self.encode(tok[:, :-1]), tok[:, 1:])

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, model, split, batch_size=64, max_batches=None, comm=None, **options):
        """Stateless: the windows one by one (``Task.evaluate``). Stateful: the whole split as
        ``batch_size`` streams at most (each at least ``EVAL_STREAM_WINDOWS`` windows long), each
        window starting from the state its row's previous window left, every byte of the streams
        scored once (the last window of each row may be shorter). ``max_batches`` windows at
        most. A data-parallel ``comm`` is ignored: every rank scores the whole split."""
        if not self.stateful:
            return super().evaluate(model, split, batch_size, max_batches=max_batches, comm=comm, **options)
        if options:
            raise ELMError(f"task '{self.name}' takes no evaluation option(s) {', '.join(sorted(options))}")
        rows = max(1, min(batch_size, (self.split_bytes(split) - 1) // (EVAL_STREAM_WINDOWS * self.length)))
        per_row = self.stream_bytes(split, rows)
        if per_row < 1:
            raise ELMError(f"task '{self.name}' has no '{split}' examples to evaluate")
        starts = self.stream_starts(split, rows)
        state = model.init_state(rows)
        total, count = 0.0, 0
        for w, offset in enumerate(range(0, per_row, self.length)):
            if max_batches is not None and w >= max_batches:
                break
            steps = min(self.length, per_row - offset)
            tok = self.tokens(starts + offset, steps)
            Y, state = model.run(self.encode(tok[:, :-1]), state)
            loss, _ = self.loss_and_grad(Y, model.xp.asarray(tok[:, 1:]))
            total += float(loss) * rows * steps
            count += rows * steps
        return {"loss": total / count, "examples": rows, "characters": count,
                "bpc": total / count / math.log(2)}

    # ---- information -------------------------------------------------------------------------
    def symbol_label(self, token):
        """How a token shows in a figure: its character, or a name for whitespace and bytes that print no glyph."""
        byte = int(self.symbols[token])
        names = {32: "space", 10: "\\n", 9: "\\t", 13: "\\r"}
        if byte in names:
            return names[byte]
        return chr(byte) if 33 <= byte < 127 else f"0x{byte:02x}"

    def preview_figure(self, plt, split, steps=96):
        """The first ``steps`` characters of one window: each step's one-hot input as a mark on its character's
        row (rows labelled with the characters), the text itself above, the next character the target."""
        from matplotlib.ticker import FixedLocator

        from elmcore.reporting.plotting import first_example
        x, target = first_example(self, split)
        tokens = x.argmax(axis=1)[:steps]
        shown = np.unique(tokens)
        row = {int(t): r for r, t in enumerate(shown)}  # only the characters that occur, in vocabulary order
        fig, (ax_text, ax) = plt.subplots(2, 1, figsize=(11, 2.2 + 0.16 * len(shown)),
                                          gridspec_kw={"height_ratios": [1, 4 + 0.1 * len(shown)]})
        ax.scatter(np.arange(len(tokens)), [row[int(t)] for t in tokens], marker="s", s=14, color="black")
        ax.yaxis.set_major_locator(FixedLocator(range(len(shown))))
        ax.set_yticklabels([self.symbol_label(t) for t in shown], fontsize=7, family="monospace")
        ax.set_ylim(-0.5, len(shown) - 0.5)
        ax.set_xlim(-0.5, len(tokens) - 0.5)
        ax.grid(axis="y", alpha=0.2)
        ax.set_xlabel("step (the target at each step is the next character)")
        ax.set_ylabel("character (one-hot input)")
        text = "".join(chr(int(self.symbols[t])) if 32 <= int(self.symbols[t]) < 127 else "·" for t in tokens)
        ax_text.axis("off")
        ax_text.text(0, 0.5, repr(text), family="monospace", fontsize=8, va="center", wrap=True)
        following = self.symbol_label(int(target[len(tokens) - 1]))
        fig.suptitle(f"{self.name} ({split}, window 0): its first {len(tokens)} of {self.length} characters "
                     f"({len(shown)} of the {self.num_input} in the vocabulary); the next one: {following}",
                     fontsize=10)
        return fig

    def reference_level(self, split):
        if self.metric != "bpc":
            return None
        return {"value": self.unigram_entropy("train"),
                "label": "unigram entropy (no context: the training split's character frequencies)"}

    def unigram_entropy(self, split="train"):
        """Entropy (bits per character) of ``split``'s byte distribution: the bits per character
        of the best model that ignores context, i.e. the chance level to beat."""
        if split not in self._unigram:
            lo, hi = self.bounds[split]
            self._unigram[split] = entropy_bits(byte_counts(self.data, lo, hi))
        return self._unigram[split]

    def reference_levels(self):
        """The unigram entropy of the train split (what ignoring context reaches) and, for a
        generated corpus, its source's entropy rate (what no model can beat), in bits per character."""
        levels = {"unigram entropy (train split)": self.unigram_entropy("train")}
        if self.entropy_rate is not None:
            levels["generator entropy rate"] = float(self.entropy_rate)
        return levels

    def model_defaults(self):
        return {"num_input": self.num_input, "num_output": self.num_output}

    def describe(self):
        info = super().describe()
        info.update({"source": self.source, "seq_len": self.length, "vocab": self.vocab,
                     "vocab_size": self.num_input, "stateful": self.stateful})
        for split in SPLITS:
            info[f"bytes_{split}"] = self.split_bytes(split)
        info["uniform_bits"] = round(math.log2(self.num_output), 4)
        info["unigram_entropy_bits_train"] = round(self.unigram_entropy("train"), 4)
        if self.entropy_rate is not None:
            info["entropy_rate_bits"] = round(float(self.entropy_rate), 4)
        return info


def _position_bounds(total, sizes):
    bounds, start = {}, 0
    for split, size in zip(SPLITS, sizes):
        bounds[split] = (start, start + size)
        start += size
    return bounds


def _single_file(data_dir, what, candidates=None):
    """``data_dir`` itself when it is a file, else its one file (or the first of ``candidates``).

    A folder written by ``generate_text`` holds the corpus and its ``corpus.json``: that is one file too.
    """
    path = os.fspath(data_dir)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"{what}: {path} does not exist")
    if candidates:
        for name in candidates:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise DataError(f"{what}: none of {', '.join(candidates)} found in {path}. "
                        f"Get it from {ENWIK8_SOURCE}")
    files = sorted(f for f in os.listdir(path)
                   if not f.startswith(".") and f != MANIFEST and os.path.isfile(os.path.join(path, f)))
    if GENERATED_NAME in files and GENERATED_INFO in files:
        files.remove(GENERATED_INFO)
    if len(files) != 1:
        listed = f" ({', '.join(files[:5])}{', …' if len(files) > 5 else ''})" if files else ""
        raise DataError(f"{what}: {path} must hold exactly one file (or pass the file itself), found "
                        f"{len(files)}{listed}")
    return os.path.join(path, files[0])


def Enwik8Task(data_dir, length=DEFAULT_LENGTH, vocab="bytes", stateful=False):
    """enwik8 from ``data_dir`` (the file ``enwik8`` or ``enwik8.zip``, or a folder holding one)."""
    path = _single_file(data_dir, ENWIK8_NAME, candidates=(ENWIK8_NAME, ENWIK8_NAME + ".zip"))
    data = read_bytes(path, expected_size=ENWIK8_SIZE, what="enwik8 file")
    return ByteLMTask(ENWIK8_NAME, data, _position_bounds(ENWIK8_SIZE, ENWIK8_SPLIT), length=length,
                      vocab=vocab, source=path, stateful=stateful)


def TextTask(data_dir, length=DEFAULT_LENGTH, vocab="corpus", stateful=False):
    """Any text or byte file (``data_dir`` the file, or a folder with one file), split 90/5/5 by position."""
    path = _single_file(data_dir, "text")
    data = read_bytes(path, what="text file")
    total = len(data)
    n_valid = n_test = int(total * TEXT_FRACTIONS[1])
    return ByteLMTask("text", data, _position_bounds(total, (total - n_valid - n_test, n_valid, n_test)),
                      length=length, vocab=vocab, source=path, stateful=stateful,
                      entropy_rate=generated_entropy_rate(path))


def generated_entropy_rate(path):
    """The entropy rate (bits per character) ``generate_text`` recorded beside the corpus at ``path``, or None."""
    if os.path.basename(path) != GENERATED_NAME:
        return None
    info_path = os.path.join(os.path.dirname(path), GENERATED_INFO)
    try:
        with open(info_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {info_path}: {e}") from None
    info = parse_json(text, info_path)
    rate = info.get("entropy_rate_bits_per_char") if isinstance(info, dict) else None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise DataError(f"{info_path}: 'entropy_rate_bits_per_char' must be a number >= 0, got {rate!r:.40}")
    return float(rate)


# ---- an offline corpus with known structure ------------------------------------------------------

class WordMarkovSource:
    """Sentences of pseudo-words drawn from a sparse first-order Markov chain over words.

    Tokens are ``num_words`` distinct words of lowercase letters plus an end-of-sentence
    token. A word is written followed by a space, or by nothing when the sentence ends
    next; the end token is written ".\\n". The text decodes back into the token sequence
    uniquely, so its entropy rate in bits per character is the chain's entropy rate per
    token divided by the mean number of characters per token (both exact, from the
    stationary distribution).
    """

    LETTERS = "aeiklmnorstu"

    def __init__(self, seed=0, num_words=24, branching=3, min_word=2, max_word=6):
        if num_words < 2 or branching < 1 or not 1 <= min_word <= max_word:
            raise DataError("word source needs num_words >= 2, branching >= 1 and "
                            "1 <= min_word <= max_word")
        rng = np.random.default_rng(seed)
        words = set()
        while len(words) < num_words:
            size = int(rng.integers(min_word, max_word + 1))
            words.add("".join(rng.choice(list(self.LETTERS), size)))
        self.words = sorted(words)
        n = num_words + 1  # the last token ends a sentence
        self.end = num_words
        P = np.zeros((n, n))
        # A random cycle through every token keeps the chain irreducible.
        cycle = rng.permutation(n)
        for a, b in zip(cycle, np.roll(cycle, -1)):
            P[a, b] = 1.0
        for i in range(n):
            others = [j for j in range(n) if P[i, j] == 0 and not (i == self.end and j == self.end)]
            extra = rng.choice(others, size=min(branching - 1, len(others)), replace=False)
            P[i, extra] = 1.0
            support = np.nonzero(P[i])[0]
            P[i, support] = rng.dirichlet(np.ones(len(support)))
        self.P = P

    def token_text(self, token, following):
        if token == self.end:
            return ".\n"
        return self.words[token] + ("" if following == self.end else " ")

    def stationary(self):
        n = len(self.P)
        A = np.vstack([self.P.T - np.eye(n), np.ones(n)])
        b = np.zeros(n + 1)
        b[-1] = 1.0
        return np.linalg.lstsq(A, b, rcond=None)[0]

    def entropy_rate_bits_per_char(self):
        """The lowest bits per character any model can reach on a long text of this source."""
        pi = self.stationary()
        P = self.P
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.where(P > 0, P * np.log2(P), 0.0).sum(axis=1)
        lengths = np.array([[len(self.token_text(i, j)) for j in range(len(P))] for i in range(len(P))])
        return float(pi @ row_entropy / (pi @ (P * lengths).sum(axis=1)))

    def sample(self, num_chars, rng):
        """A text of exactly ``num_chars`` characters, starting at a sentence start."""
        parts, size = [], 0
        token = int(rng.choice(len(self.P), p=self.P[self.end]))
        cdf = np.cumsum(self.P, axis=1)
        while size < num_chars:
            following = min(int(np.searchsorted(cdf[token], rng.random(), side="right")), len(self.P) - 1)
            piece = self.token_text(token, following)
            parts.append(piece)
            size += len(piece)
            token = following
        return "".join(parts)[:num_chars]


def generate_text(out_dir, num_chars=100_000, seed=0, num_words=24, branching=3):
    """Write ``out_dir/corpus.txt`` (``num_chars`` ASCII characters) from a :class:`WordMarkovSource`,
    and ``out_dir/corpus.json``: the generator's settings, its words and its entropy rate."""
    from elmcore.engine.memory import check_memory
    if isinstance(num_chars, bool) or not isinstance(num_chars, (int, np.integer)) or num_chars < 1:
        raise DataError(f"num_chars must be a positive integer, got {num_chars!r}")
    for name, value, low, high in (("num_words", num_words, 2, MAX_WORDS), ("branching", branching, 1, MAX_WORDS)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            shown = value if not isinstance(value, int) or value.bit_length() < 128 else "a huge integer"
            raise DataError(f"text option {name} must be an integer in [{low}, {high}], got {shown!r}")
    # The text is built in memory: a word object per few characters, then the joined and encoded copies.
    check_memory(BYTES_PER_GENERATED_CHAR * int(num_chars), f"generating a text of {int(num_chars):,} characters")
    source = WordMarkovSource(seed=seed, num_words=num_words, branching=branching)
    text = source.sample(int(num_chars), np.random.default_rng([seed, 1]))
    path = os.path.join(os.fspath(out_dir), GENERATED_NAME)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(text.encode("ascii"))
    info = {"generator": "WordMarkovSource (elmcore.data.text)", "seed": int(seed), "num_chars": int(num_chars),
            "num_words": int(num_words), "branching": int(branching), "words": source.words,
            "entropy_rate_bits_per_char": source.entropy_rate_bits_per_char()}
    atomic_write_text(os.path.join(os.fspath(out_dir), GENERATED_INFO), json.dumps(info, indent=2) + "\n")
    return path
