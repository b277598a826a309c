"""Text / enwik8 data: a corpus file given as --data-dir is read wherever a task reads one file, and hostile
corpora, options and generator sizes are refused with one `error:` line, at once."""

import os
import zipfile

import numpy as np
import pytest

from elmcore.data.text import generate_text
from hostile import assert_refused, assert_unchanged, invoke, snapshot

TINY_TEXT = ["--task", "text", "--task-option", "length=4", "--set", "num_memory=2", "--set", "mlp_hidden_size=3",
             "--batch-size", "8", "--batches-per-epoch", "2", "--eval-batch-size", "64", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_text(tmp_path_factory.mktemp("corpus"), num_chars=1500, seed=1)


@pytest.mark.slow
def test_a_corpus_file_is_accepted_as_data_dir_by_train_eval_and_info(corpus, tmp_path):
    run_dir = tmp_path / "run"
    before = snapshot(corpus)
    trained = invoke("train", *TINY_TEXT, "--data-dir", corpus, "--run-dir", run_dir, seconds=900)
    assert trained.exit_code == 0, trained.output
    evaluated = invoke("eval", run_dir, "--data-dir", corpus, seconds=300)
    assert evaluated.exit_code == 0, evaluated.output
    assert "test bpc" in evaluated.output
    described = invoke("data", "info", corpus, "--task", "text", "--option", "length=4")
    assert described.exit_code == 0 and "vocab_size" in described.output, described.output
    assert_unchanged(before, corpus)


def test_a_task_that_reads_a_directory_says_so_when_given_a_file(corpus, tmp_path):
    assert_refused(invoke("train", "--task", "listops", "--data-dir", corpus, "--run-dir", tmp_path / "r",
                          "--quiet"), "is a file", "listops")
    assert not (tmp_path / "r").exists()


# ---- hostile corpora and options -----------------------------------------------------------------

def _fifo(tmp_path):
    path = tmp_path / "fifo.txt"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p / "missing.txt", "missing.txt"),
    (lambda p: (p / "empty.txt").write_bytes(b"") and None or p / "empty.txt", "empty"),
    (lambda p: (p / "short.txt").write_bytes(b"ab" * 5) and None or p / "short.txt", "window"),
    (lambda p: (p / "one.txt").write_bytes(b"a" * 5000) and None or p / "one.txt", "single byte value"),
    (lambda p: ((p / "d").mkdir(), (p / "d" / "a.txt").write_text("x" * 100), (p / "d" / "b.txt").write_text("y"))
     and p / "d", "exactly one file"),
    (lambda p: (p / "e").mkdir() or p / "e", "exactly one file"),
    (lambda p: (p / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip") and None or p / "bad.zip", "bad.zip"),
    (_fifo, "fifo.txt"),
])
def test_a_hostile_corpus_is_refused_naming_it(tmp_path, make, fragment):
    path = make(tmp_path)
    result = invoke("data", "info", path, "--task", "text", "--option", "length=8", seconds=30)
    assert_refused(result, fragment)


def test_a_zip_that_claims_more_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "corpus.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("corpus.txt", b"abc " * 100)
    data = bytearray(path.read_bytes())
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # forge the uncompressed size in both headers
        at = data.find(header)
        size_at = at + (22 if header == b"PK\x03\x04" else 24)
        data[size_at:size_at + 4] = (2 ** 31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert_refused(invoke("data", "info", path, "--task", "text", seconds=30), "corpus.zip")


@pytest.mark.parametrize("option,fragment", [("length=0", "length"), ("length=" + "9" * 4000, "length"),
                                             ("vocab=words", "vocab"), ("length=2.5", "length")])
def test_a_bad_text_option_is_refused(corpus, option, fragment):
    assert_refused(invoke("data", "info", corpus, "--task", "text", "--option", option), fragment)


def test_enwik8_of_the_wrong_size_is_refused(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"<mediawiki>" * 100)
    assert_refused(invoke("data", "info", tmp_path, "--task", "enwik8"), "100,000,000")


# ---- the generator: sizes refused before anything is built ------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--n", str(10 ** 15)], "memory"),
    (["--n", str(10 ** 40)], "n must be"),
    (["-O", "num_words=1000000000"], "num_words"),
    (["-O", "num_words=" + "9" * 400], "num_words"),
    (["-O", "num_words=1"], "num_words"),
    (["-O", "branching=0"], "branching"),
    (["-O", "branching=1000000000"], "branching"),
])
def test_a_text_generator_size_that_cannot_be_built_is_refused_at_once(tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_refused(invoke("data", "generate", "text", "--out", out, *args, seconds=20), fragment)
    assert not (out / "corpus.txt").exists()


# ---- the other one-file data sets: values a float32 model cannot hold ---------------------------

@pytest.mark.parametrize("entry", ["train/X", "train/target"])
def test_a_synthetic_file_with_values_beyond_float32_is_named_not_warned_about(tmp_path, entry):
    from elmcore.data.synthetic import make_synthetic
    path = make_synthetic("adding", n=20, length=4).save(tmp_path / "adding.npz")
    with zipfile.ZipFile(path) as z:
        arrays = {name[:-4]: np.lib.format.read_array(z.open(name)) for name in z.namelist()}
    arrays[entry] = arrays[entry].astype(np.float64)
    arrays[entry].reshape(-1)[0] = 1e300
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    before = snapshot(path)
    assert_refused(invoke("train", "--task", "adding", "--data-dir", path, "--run-dir", tmp_path / "r", "--quiet"),
                   "adding.npz", entry)
    assert_unchanged(before, path)


def test_a_preview_onto_the_corpus_of_a_text_directory_is_refused(corpus):
    before = snapshot(corpus)
    assert_refused(invoke("data", "info", os.path.dirname(corpus), "--task", "text", "--option", "length=4",
                          "--preview", corpus), "corpus.txt")
    assert_unchanged(before, corpus)
