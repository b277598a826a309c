"""Character-level language modelling: the enwik8 and text readers, the generated corpus, the
next-token loss and bits per character."""

import json
import math
import os
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.data_cmd import data as data_cli
from elmcore.data import registry
from elmcore.data.text import ENWIK8_SIZE, WordMarkovSource, byte_counts, entropy_bits, generate_text, read_bytes
from elmcore.errors import DataError, ELMError
from elmcore.training.evaluate import evaluate_batches
from elmcore.training.losses import LOSS_FUNCTIONS, cross_entropy_all


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate_text(out, num_chars=4000, seed=3)
    return out


def write(path, payload):
    path.write_bytes(payload)
    return path


# ---- the generated corpus ----------------------------------------------------------------

def test_generated_corpus_is_deterministic_ascii_sentences(tmp_path):
    a = generate_text(tmp_path / "a", num_chars=3000, seed=5)
    b = generate_text(tmp_path / "b", num_chars=3000, seed=5)
    c = generate_text(tmp_path / "c", num_chars=3000, seed=6)
    text = open(a, "rb").read()
    assert os.path.basename(a) == "corpus.txt" and len(text) == 3000
    assert text == open(b, "rb").read() and text != open(c, "rb").read()
    decoded = text.decode("ascii")
    assert set(decoded) <= set(WordMarkovSource.LETTERS + " .\n")
    source = WordMarkovSource(seed=5)
    # Every complete word of the text is one of the source's words: the structure is real.
    words = decoded.replace(".\n", " ").split()[:-1]
    assert words and set(words) <= set(source.words)
    assert sorted(os.listdir(tmp_path / "a")) == ["corpus.json", "corpus.txt"]   # no temporary file left


def test_generated_corpus_records_its_entropy_rate_and_the_task_reports_it(tmp_path):
    """corpus.json beside the corpus holds the source's words and entropy rate; the text task
    (given the folder or the file) reads it as a reference level, beside the unigram entropy."""
    generate_text(tmp_path, num_chars=3000, seed=5)
    source = WordMarkovSource(seed=5)
    info = json.loads((tmp_path / "corpus.json").read_text())
    assert info["words"] == source.words
    assert info["entropy_rate_bits_per_char"] == pytest.approx(source.entropy_rate_bits_per_char(), rel=1e-12)
    for where in (tmp_path, tmp_path / "corpus.txt"):
        task = registry.get_task("text", where, length=16)
        assert task.reference_levels() == {
            "unigram entropy (train split)": task.unigram_entropy("train"),
            "generator entropy rate": pytest.approx(info["entropy_rate_bits_per_char"], rel=1e-12)}
        assert task.describe()["entropy_rate_bits"] == round(info["entropy_rate_bits_per_char"], 4)
    run_info = task.run_info()
    assert run_info["vocab"] == sorted(set((tmp_path / "corpus.txt").read_bytes()))
    assert (run_info["loss_unit"], run_info["metric_unit"]) == ("nats/char", "bits/char")
    # Any other text file has no known rate; a damaged record is named.
    (tmp_path / "other.txt").write_bytes((tmp_path / "corpus.txt").read_bytes())
    other = registry.get_task("text", tmp_path / "other.txt", length=16)
    assert "generator entropy rate" not in other.reference_levels()
    (tmp_path / "corpus.json").write_text('{"entropy_rate_bits_per_char": "low"}')
    with pytest.raises(ELMError, match="corpus.json"):
        registry.get_task("text", tmp_path / "corpus.txt", length=16)


def test_source_entropy_rate_is_exact_and_far_below_the_unigram_entropy():
    source = WordMarkovSource(seed=0)
    rate = source.entropy_rate_bits_per_char()
    # An order-0 estimate on a long sample is an upper bound on the entropy rate.
    text = source.sample(200_000, np.random.default_rng(1)).encode("ascii")
    unigram = entropy_bits(np.bincount(np.frombuffer(text, np.uint8), minlength=256))
    assert 0 < rate < 0.5 * unigram
    # Rate per token / chars per token, recomputed from the empirical token sequence.
    pieces = text.decode().replace(".\n", " .\n ").split(" ")
    tokens = [p for p in pieces if p]
    assert abs(len(text) / len(tokens) - _mean_chars_per_token(source)) < 0.05


def _mean_chars_per_token(source):
    pi, P = source.stationary(), source.P
    lengths = np.array([[len(source.token_text(i, j)) for j in range(len(P))] for i in range(len(P))])
    return float(pi @ (P * lengths).sum(axis=1))


# ---- the text reader ----------------------------------------------------------------------

def test_text_task_splits_by_position_and_one_hot_windows(corpus_dir):
    task = registry.get_task("text", corpus_dir, length=16)
    raw = (corpus_dir / "corpus.txt").read_bytes()
    assert (task.loss, task.metric, task.higher_is_better) == ("cross_entropy_all", "bpc", False)
    assert task.bounds == {"train": (0, 3600), "valid": (3600, 3800), "test": (3800, 4000)}
    symbols = sorted(set(raw))
    assert task.num_input == task.num_output == len(symbols)
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [3599 // 16, 199 // 16, 199 // 16]
    batches = list(task.batches("valid", 5))
    assert [len(b.X) for b in batches] == [5, 5, 2]
    X, target = batches[0].X, batches[0].target
    assert X.dtype == np.uint8 and X.shape == (5, 16, len(symbols)) and (X.sum(axis=2) == 1).all()
    assert target.dtype == np.int64 and target.shape == (5, 16)
    decode = np.array(symbols, np.uint8)
    for b in range(5):
        start = 3600 + 16 * b
        assert bytes(decode[X[b].argmax(axis=1)]) == raw[start:start + 16]
        assert bytes(decode[target[b]]) == raw[start + 1:start + 17]   # the next byte at every step


def test_training_windows_are_random_but_deterministic_and_stay_in_the_split(corpus_dir):
    task = registry.get_task("text", corpus_dir, length=16)
    draw = [task.window_starts("train", np.random.default_rng(s), shuffle=True) for s in (1, 1, 2)]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])
    assert len(draw[0]) == task.num_examples("train")
    assert draw[0].min() >= 0 and draw[0].max() + 16 + 1 <= 3600
    assert len(np.unique(draw[0] % 16)) > 1          # not only the aligned windows
    one = [b.target for b in task.batches("train", 7, rng=np.random.default_rng(1), shuffle=True)]
    two = [b.target for b in task.batches("train", 7, rng=np.random.default_rng(1), shuffle=True)]
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and len(one) == math.ceil(224 / 7)


def test_vocab_bytes_and_unigram_entropy(corpus_dir):
    task = registry.get_task("text", corpus_dir / "corpus.txt", length=8, vocab="bytes")
    assert task.num_input == 256
    batch = next(iter(task.batches("test", 2)))
    raw = (corpus_dir / "corpus.txt").read_bytes()
    assert bytes(batch.X[0].argmax(axis=1).astype(np.uint8)) == raw[3800:3808]
    counts = np.bincount(np.frombuffer(raw[:3600], np.uint8), minlength=256)
    p = counts[counts > 0] / 3600
    assert task.unigram_entropy("train") == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-12)
    info = task.describe()
    assert info["unigram_entropy_bits_train"] == round(task.unigram_entropy("train"), 4)
    assert info["uniform_bits"] == 8.0 and info["bytes_valid"] == 200


# ---- stateful (truncated BPTT) batching and evaluation ------------------------------------------

def test_stateful_batches_read_contiguous_streams(corpus_dir):
    """Row b of every batch reads the b-th contiguous 1/B of the split, and batch w + 1 continues
    exactly where batch w stopped; the order is the streams' whatever the rng."""
    task = registry.get_task("text", corpus_dir, length=16, stateful=True)
    raw = (corpus_dir / "corpus.txt").read_bytes()
    decode = task.vocabulary.symbols
    rows = 5
    per_row = 3599 // rows
    assert task.stream_bytes("train", rows) == per_row
    assert task.num_batches("train", rows) == per_row // 16
    batches = list(task.batches("train", rows, rng=np.random.default_rng(0), shuffle=True))
    assert len(batches) == per_row // 16
    for w, batch in enumerate(batches):
        assert batch.X.shape == (rows, 16, task.num_input)
        for b in range(rows):
            start = b * per_row + 16 * w
            assert bytes(decode[batch.X[b].argmax(axis=1)]) == raw[start:start + 16]
            assert bytes(decode[batch.target[b]]) == raw[start + 1:start + 17]
    again = list(task.batches("train", rows, rng=np.random.default_rng(1), shuffle=True))
    assert all(np.array_equal(a.target, b.target) for a, b in zip(batches, again))
    # A stateless task of the same file keeps its own counting.
    assert registry.get_task("text", corpus_dir, length=16).num_batches("train", rows) == math.ceil(224 / rows)


def test_stateful_batches_refuse_streams_shorter_than_a_window(corpus_dir):
    task = registry.get_task("text", corpus_dir, length=16, stateful=True)
    with pytest.raises(DataError, match="smaller batch size or length"):
        next(iter(task.batches("valid", 64)))
    with pytest.raises(ELMError, match="stateful must be true or false"):
        registry.get_task("text", corpus_dir, stateful="yes")


def test_stateful_evaluation_is_one_pass_over_each_stream(corpus_dir):
    """Windows chained through the carried state score every byte of each stream exactly as one
    forward pass over the whole stream does (float64), here 3 streams of the valid split."""
    from elmcore import ELM
    from elmcore.neuron.config import ELMConfig
    task = registry.get_task("text", corpus_dir, length=8, stateful=True)
    cfg = ELMConfig(num_input=task.num_input, num_output=task.num_output, num_memory=4, mlp_hidden_size=6,
                    num_branch=3, num_synapse_per_branch=2, input_to_synapse_routing="random_routing",
                    memory_tau_max=20.0)
    model = ELM(cfg, seed=2, dtype="float64")
    rows = (199 // (8 * 8))
    result = task.evaluate(model, "valid", batch_size=64)
    per_row = 199 // rows
    assert (result["examples"], result["characters"]) == (rows, rows * per_row)
    tokens = task.tokens(task.stream_starts("valid", rows), per_row)
    Y = model.forward(task.encode(tokens[:, :-1]))
    loss, _ = cross_entropy_all(Y, tokens[:, 1:])
    assert result["loss"] == pytest.approx(loss, rel=1e-12)
    assert result["bpc"] == pytest.approx(loss / math.log(2), rel=1e-12)
    assert task.evaluate(model, "valid", batch_size=64, max_batches=2)["characters"] == rows * 16


def test_byte_counts_read_in_chunks(monkeypatch):
    import elmcore.data.text as text
    monkeypatch.setattr(text, "_COUNT_CHUNK", 7)
    data = np.random.default_rng(0).integers(0, 256, 100).astype(np.uint8)
    np.testing.assert_array_equal(byte_counts(data, 3, 95), np.bincount(data[3:95], minlength=256))


def test_text_file_problems_are_named(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        registry.get_task("text", write(tmp_path / "empty.txt", b""))
    with pytest.raises(DataError, match="fewer than one window"):
        registry.get_task("text", write(tmp_path / "short.txt", b"abcdefghij" * 30), length=64)
    with pytest.raises(DataError, match="single byte value"):
        registry.get_task("text", write(tmp_path / "same.txt", b"a" * 4000), length=8)
    two = tmp_path / "two"
    two.mkdir()
    write(two / "a.txt", b"x" * 100)
    write(two / "b.txt", b"y" * 100)
    with pytest.raises(DataError, match="exactly one file.*found 2"):
        registry.get_task("text", two)
    with pytest.raises(DataError, match="does not exist"):
        registry.get_task("text", tmp_path / "absent")
    with pytest.raises(ELMError, match="option length must be >= 1, got 0"):
        registry.get_task("text", two / "a.txt", length=0)
    with pytest.raises(ELMError, match="vocab must be one of bytes, corpus"):
        registry.get_task("text", two / "a.txt", vocab="words")


def test_text_reads_the_one_file_inside_a_zip_and_refuses_bombs(tmp_path, corpus_dir):
    raw = (corpus_dir / "corpus.txt").read_bytes()
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("corpus.txt", raw)
    np.testing.assert_array_equal(read_bytes(tmp_path / "corpus.zip"), np.frombuffer(raw, np.uint8))
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a", b"0" * 100)
    with pytest.raises(DataError, match="would unpack to"):
        read_bytes(tmp_path / "bomb.zip", expected_size=50)
    write(tmp_path / "broken.zip", (tmp_path / "corpus.zip").read_bytes()[:200])
    with pytest.raises(DataError, match="broken.zip"):
        read_bytes(tmp_path / "broken.zip")


# ---- enwik8 --------------------------------------------------------------------------------

def _sparse_enwik8(path):
    """A 100,000,000-byte file (sparse: zeros) with markers at the split boundaries."""
    with open(path, "wb") as f:
        f.truncate(ENWIK8_SIZE)
        for offset, mark in ((0, b"T"), (90_000_000, b"V"), (95_000_000, b"X"), (ENWIK8_SIZE - 1, b"E")):
            f.seek(offset)
            f.write(mark)
    return path


def test_enwik8_standard_split_and_bytes_as_tokens(tmp_path):
    _sparse_enwik8(tmp_path / "enwik8")
    task = registry.get_task("enwik8", tmp_path, length=32)
    assert task.num_input == task.num_output == 256 and task.vocab == "bytes"
    assert task.bounds == {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                           "test": (95_000_000, 100_000_000)}
    assert isinstance(task.data, np.memmap)          # streamed, never read whole
    for split, mark in (("train", "T"), ("valid", "V"), ("test", "X")):
        batch = next(iter(task.batches(split, 2)))
        assert batch.X[0, 0].argmax() == ord(mark) and batch.X.shape == (2, 32, 256)
        assert batch.target[0, 0] == 0
    assert task.num_examples("test") == (5_000_000 - 1) // 32
    assert registry.detect_task(tmp_path) == "enwik8"
    same = registry.get_task("enwik8", tmp_path / "enwik8", length=32)   # the file itself
    assert same.bounds == task.bounds


def test_enwik8_zip_is_read_and_wrong_sizes_are_named(tmp_path):
    zdir = tmp_path / "z"
    zdir.mkdir()
    with zipfile.ZipFile(zdir / "enwik8.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("enwik8", "w") as member:
            block = bytes(1 << 20)
            for _ in range(ENWIK8_SIZE // len(block)):
                member.write(block)
            member.write(bytes(ENWIK8_SIZE % len(block) - 1) + b"E")
    task = registry.get_task("enwik8", zdir, length=4)
    assert len(task.data) == ENWIK8_SIZE and task.data[-1] == ord("E")

    small = tmp_path / "small"
    small.mkdir()
    write(small / "enwik8", b"<mediawiki>" * 10)
    with pytest.raises(DataError, match=r"has 110 bytes; the standard enwik8 file has exactly 100,000,000"):
        registry.get_task("enwik8", small)
    with zipfile.ZipFile(small / "other.zip", "w") as z:
        z.writestr("enwik8", b"short")
    with pytest.raises(DataError, match="5 bytes, not 100,000,000|has 5 bytes"):
        registry.get_task("enwik8", small / "other.zip")
    with pytest.raises(DataError, match="none of enwik8, enwik8.zip found.*mattmahoney.net"):
        registry.get_task("enwik8", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        registry.get_task("enwik8", tmp_path / "absent")


# ---- the loss and the metric ---------------------------------------------------------------

def test_cross_entropy_all_value_and_finite_difference_gradient():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(2, 3, 5)) * 3
    targets = rng.integers(0, 5, (2, 3))
    loss, dY = cross_entropy_all(Y, targets)
    expected = np.mean([np.log(np.exp(Y[b, t]).sum()) - Y[b, t, targets[b, t]]
                        for b in range(2) for t in range(3)])
    assert loss == pytest.approx(expected, rel=1e-13)
    assert LOSS_FUNCTIONS["cross_entropy_all"] is cross_entropy_all
    eps = 1e-6
    numeric = np.zeros_like(Y)
    for idx in np.ndindex(Y.shape):
        up, down = Y.copy(), Y.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (cross_entropy_all(up, targets)[0] - cross_entropy_all(down, targets)[0]) / (2 * eps)
    np.testing.assert_allclose(dY, numeric, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 2e-6)])
def test_cross_entropy_all_kernel_computes_what_the_array_form_does(dtype, tol):
    from elmcore.training import losses
    rng = np.random.default_rng(1)
    Y = (rng.normal(size=(3, 7, 33)) * 4).astype(dtype)
    Y[1, 2] += 90  # a row far from zero: the shift by its maximum matters
    Y[2, 5, 4] = np.nan
    Y[0, 6, 0] = np.inf
    Y[1, 1, 3] = -np.inf  # a logit of probability 0: the row stays defined
    targets = rng.integers(0, 33, (3, 7))
    loss, dY = cross_entropy_all(Y, targets)  # the kernel (kernels/softmax.py)
    finite = np.ones((3, 7), bool)
    finite[2, 5] = finite[0, 6] = False
    with np.errstate(invalid="ignore"):  # inf − inf in the array form
        ref_loss, ref_dY = losses._cross_entropy_all_arrays(np, Y, targets)
    assert np.isnan(loss) and np.isnan(ref_loss)
    assert np.isnan(dY[~finite]).all() and np.isnan(ref_dY[~finite]).all()
    assert dY.dtype == Y.dtype and np.abs(dY[finite] - ref_dY[finite]).max() <= tol * np.abs(ref_dY[finite]).max()
    Y[2, 5, 4] = Y[0, 6, 0] = 0
    loss, _ = cross_entropy_all(Y, targets)
    assert loss == pytest.approx(float(losses._cross_entropy_all_arrays(np, Y, targets)[0]), rel=tol)


def test_cross_entropy_all_is_stable_and_checks_targets():
    Y = np.array([[[1000.0, 0.0], [-1000.0, 0.0]]])
    loss, dY = cross_entropy_all(Y, np.array([[1, 0]]))
    assert loss == pytest.approx(1000.0) and np.isfinite(dY).all()
    with pytest.raises(DataError, match=r"shape \(1, 2\)"):
        cross_entropy_all(Y, np.array([1, 0]))
    with pytest.raises(DataError, match=r"lie in \[0, 2\)"):
        cross_entropy_all(Y, np.array([[2, 0]]))
    with pytest.raises(DataError, match="integers"):
        cross_entropy_all(Y, np.array([[1.0, 0.0]]))


class _UnigramModel:
    """Predicts the same log-probabilities at every step: bits per character = cross-entropy."""

    xp = np

    def __init__(self, log_p):
        self.log_p = log_p

    class backend:
        @staticmethod
        def to_host(a):
            return a

    def forward(self, X):
        return np.broadcast_to(self.log_p, X.shape[:2] + self.log_p.shape).astype(np.float64)


def test_bits_per_character_of_the_unigram_model_is_the_cross_entropy(corpus_dir):
    task = registry.get_task("text", corpus_dir, length=16)
    raw = np.frombuffer((corpus_dir / "corpus.txt").read_bytes(), np.uint8)
    counts = np.bincount(task.index_of[raw[:3600]], minlength=task.num_output) + 1.0
    log_p = np.log(counts / counts.sum())
    result = evaluate_batches(_UnigramModel(log_p), task, "valid", batch_size=4)
    windows = 3600 + 16 * np.arange(task.num_examples("valid"))[:, None] + 1 + np.arange(16)
    expected_bits = -log_p[task.index_of[raw[windows]]].mean() / math.log(2)
    assert result["bpc"] == pytest.approx(expected_bits, rel=1e-12)
    assert result["loss"] == pytest.approx(expected_bits * math.log(2), rel=1e-12)


# ---- CLI -----------------------------------------------------------------------------------

def test_cli_generate_and_info_text(tmp_path):
    result = CliRunner().invoke(data_cli, ["generate", "text", "--out", str(tmp_path), "--n", "5000"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "corpus.txt").stat().st_size == 5000
    result = CliRunner().invoke(data_cli, ["info", str(tmp_path), "--task", "text", "-O", "length=32"])
    assert result.exit_code == 0, result.output
    assert "unigram_entropy_bits_train:" in result.output and "n_valid: 7" in result.output


@pytest.mark.parametrize("task, make, message", [
    ("text", lambda p: write(p / "empty.txt", b""), "is empty"),
    ("enwik8", lambda p: write(p / "enwik8", b"abc"), "standard enwik8 file"),
    ("enwik8", lambda p: write(p / "enwik8.zip", b"PK\x03\x04 not really a zip"), "enwik8"),
])
def test_cli_bad_files_exit_2_with_one_error_line(tmp_path, task, make, message):
    make(tmp_path)
    result = CliRunner().invoke(data_cli, ["info", str(tmp_path), "--task", task])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
