"""elm convert / info / predict / eval on the release checkpoints, and bad input handled cleanly."""

import glob
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.training.checkpoint import load_model
from elmcore.verification.oracle import load_oracle, relative_error
from helpers import GOLDEN_DIR, REFERENCE_DIR

CHECKPOINTS = sorted(glob.glob(os.path.join(REFERENCE_DIR, "*", "neuronio_best_model_state.pt")))


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for pt in CHECKPOINTS:
        name = os.path.basename(os.path.dirname(pt))
        dest = out / f"{name}.npz"
        result = invoke("convert", pt, "-o", dest, "--dtype", "float64")
        assert result.exit_code == 0, result.output
        paths[name] = dest
    return paths


def test_all_release_checkpoints_convert_with_spec_counts(converted):
    assert len(converted) == 15
    for name, path in converted.items():
        with open(os.path.join(REFERENCE_DIR, name, "model_stats.json")) as f:
            expected = json.load(f)["model_param_count"]
        result = invoke("info", path)
        assert result.exit_code == 0, result.output
        assert f"parameters: {expected}" in result.output.splitlines()


def test_predict_with_converted_best_model_reproduces_the_release(converted, tmp_path):
    case = load_oracle(os.path.join(GOLDEN_DIR, "official_best_elm_neuron.npz"))
    np.save(tmp_path / "x.npy", case.X)
    result = invoke("predict", converted["best_elm_neuron"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "y.npy", "--dtype", "float64")
    assert result.exit_code == 0, result.output
    Y = np.load(tmp_path / "y.npy")
    assert relative_error(Y, case.Y) < 1e-10
    # The eval head: sigmoid spike probability, soma in mV.
    result = invoke("predict", converted["best_elm_neuron"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "h.npy", "--head", "neuronio", "--dtype", "float64")
    assert result.exit_code == 0
    H = np.load(tmp_path / "h.npy")
    np.testing.assert_allclose(H[..., 0], 1 / (1 + np.exp(-case.Y[..., 0])), rtol=1e-9)
    np.testing.assert_allclose(H[..., 1], case.Y[..., 1] / 0.1, rtol=1e-9)


def test_predict_accepts_a_single_sequence(converted, tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.random((30, 1278)) < 0.02).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    result = invoke("predict", converted["num_memory_5"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    Y = np.load(tmp_path / "y.npy")
    model = load_model(converted["num_memory_5"])
    assert Y.shape == (30, 2)
    np.testing.assert_allclose(Y, model.forward(X[None])[0], rtol=1e-6, atol=1e-6)


def test_convert_then_hidden_input_matches_loading_the_pt_directly(converted):
    from elmcore import ELM
    from elmcore.verification.torch_checkpoint import load_release_model
    rng = np.random.default_rng(1)
    X = (rng.random((2, 40, 1278)) < 0.02) * np.where(np.arange(1278) < 639, 1.0, -1.0)
    for pt in CHECKPOINTS:
        name = os.path.basename(os.path.dirname(pt))
        cfg, params = load_release_model(pt)
        direct = ELM(cfg, params=params, dtype="float64").forward(X)
        via_file = load_model(converted[name], dtype="float64").forward(X)
        assert np.array_equal(direct, via_file)


@pytest.mark.parametrize("problem", ["wrong_shape", "nan", "missing", "not_npy"])
def test_predict_bad_input_exits_2(converted, tmp_path, problem):
    path = tmp_path / "x.npy"
    if problem == "wrong_shape":
        np.save(path, np.zeros((2, 5, 100)))
    elif problem == "nan":
        X = np.zeros((1, 5, 1278))
        X[0, 3, 7] = np.nan
        np.save(path, X)
    elif problem == "not_npy":
        path.write_text("hello")
    out = tmp_path / "y.npy"
    out.write_bytes(b"precious")
    result = invoke("predict", converted["num_memory_1"], "--input", path, "--output", out)
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert {"wrong_shape": "shape", "nan": "step 3, input 7", "missing": "not found",
            "not_npy": "not a readable"}[problem] in result.output
    assert out.read_bytes() == b"precious"  # the user's file is untouched


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_param", "wrong_format"])
def test_damaged_model_files_exit_2(converted, tmp_path, damage):
    src = converted["num_memory_2"]
    bad = tmp_path / "bad.npz"
    data = src.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 100)
    else:
        with np.load(src) as d:
            arrays = {k: d[k] for k in d.files}
        if damage == "missing_param":
            del arrays["param/w_y.bias"]
        else:
            arrays["format"] = np.array("something-else")
        np.savez(bad, **arrays)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 1278)))
    for args in (["info", bad], ["predict", bad, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "bad.npz" in result.output
    assert not (tmp_path / "y.npy").exists()


def test_convert_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pt = tmp_path / "evil.pt"
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    (tmp_path / "model_config.json").write_text(json.dumps({"num_input": 2, "num_output": 1}))
    result = invoke("convert", pt, "-o", tmp_path / "m.npz")
    assert result.exit_code == 2
    assert "system" in result.output
    assert not marker.exists() and not (tmp_path / "m.npz").exists()


def test_convert_missing_config_is_clear(tmp_path):
    pt = tmp_path / "lonely.pt"
    pt.write_bytes(open(CHECKPOINTS[0], "rb").read())
    result = invoke("convert", pt, "-o", tmp_path / "m.npz")
    assert result.exit_code == 2 and "model_config.json" in result.output


# ---- character models: vocabulary, text in and out, sampling ------------------------------------

CHAR_TEXT = "ten tiny lines.\nlost tunes.\n"


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """An untrained Branch-ELM over the bytes of CHAR_TEXT, saved with its vocabulary, and one saved without."""
    from elmcore import ELM
    from elmcore.data.vocab import Vocabulary
    from elmcore.neuron.config import ELMConfig
    from elmcore.training.checkpoint import save_model
    out = tmp_path_factory.mktemp("char_model")
    vocab = Vocabulary(sorted(set(CHAR_TEXT.encode())))
    cfg = ELMConfig(num_input=len(vocab), num_output=len(vocab), num_memory=4, mlp_hidden_size=6, num_branch=3,
                    num_synapse_per_branch=3, input_to_synapse_routing="random_routing", memory_tau_max=20.0)
    model = ELM(cfg, seed=3, dtype="float64")
    save_model(out / "char.npz", cfg, model.state_dict(), dtype="float64", vocab=vocab)
    save_model(out / "plain.npz", cfg, model.state_dict(), dtype="float64")
    return out, model, vocab


def test_vocabulary_round_trip_encode_predict_decode(char_model, tmp_path):
    """Text -> channels -> one-hot -> decode is the identity; `elm predict` encodes a text file with
    the model's own vocabulary (the outputs equal the model on the one-hot input) and decodes
    its outputs into the most likely next character after each input character."""
    from elmcore.training.checkpoint import load_file
    out, model, vocab = char_model
    tokens = vocab.encode_text(CHAR_TEXT)
    X = vocab.one_hot(tokens)
    assert X.shape == (len(CHAR_TEXT), len(vocab)) and X.dtype == np.uint8
    assert vocab.decode(X.argmax(axis=-1)) == CHAR_TEXT.encode()
    assert load_file(out / "char.npz").vocab == vocab
    (tmp_path / "in.txt").write_text(CHAR_TEXT)
    result = invoke("predict", out / "char.npz", "--input", tmp_path / "in.txt", "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    Y = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(Y, model.forward(X[None])[0])
    result = invoke("predict", out / "char.npz", "--input", tmp_path / "in.txt", "--output", tmp_path / "next.txt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "next.txt").read_bytes() == vocab.decode(Y.argmax(axis=-1))
    assert len((tmp_path / "next.txt").read_bytes()) == len(CHAR_TEXT)


def test_sample_is_reproducible_and_steps_once_per_character(char_model, monkeypatch):
    from elmcore import ELM
    out, _, vocab = char_model
    first = invoke("sample", out / "char.npz", "--prompt", "ten ", "--length", "40", "--seed", "7")
    assert first.exit_code == 0, first.output
    assert first.output.startswith("ten ") and len(first.output.rstrip("\n")) >= 40
    assert invoke("sample", out / "char.npz", "--prompt", "ten ", "--length", "40", "--seed", "7").output \
        == first.output
    assert invoke("sample", out / "char.npz", "--prompt", "ten ", "--length", "40", "--seed", "8").output \
        != first.output
    greedy = [invoke("sample", out / "char.npz", "--length", "20", "--temperature", "0", "--seed", s).output
              for s in ("1", "2")]
    assert greedy[0] == greedy[1]
    steps = []
    real_step = ELM.step
    monkeypatch.setattr(ELM, "step", lambda self, state, x: steps.append(x.shape) or real_step(self, state, x))
    assert invoke("sample", out / "char.npz", "--prompt", "lost", "--length", "9").exit_code == 0
    assert steps == [(1, len(vocab))] * (4 + 9 - 1)  # the last sample needs no step after it


@pytest.mark.parametrize("args, message", [
    (["--prompt", "tenZ"], "character 'Z' (character 3), which is not in the model's vocabulary"),
    (["--prompt", "né"], "character 'é' (U+00E9) (character 1)"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--length", "0"], "--length"),
    (["--prompt", ""], "prompt is empty"),
])
def test_sample_refuses_bad_requests(char_model, args, message):
    out, _, _ = char_model
    result = invoke("sample", out / "char.npz", *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_models_without_a_vocabulary_refuse_text(char_model, tmp_path):
    out, _, _ = char_model
    result = invoke("sample", out / "plain.npz")
    assert result.exit_code == 2 and "has no vocabulary" in result.output
    (tmp_path / "in.txt").write_text(CHAR_TEXT)
    result = invoke("predict", out / "plain.npz", "--input", tmp_path / "in.txt", "--output", tmp_path / "y.npy")
    assert result.exit_code == 2 and "has no vocabulary" in result.output
    result = invoke("predict", out / "char.npz", "--input", tmp_path / "in.txt", "--output", tmp_path / "y.txt",
                    "--head", "neuronio")
    assert result.exit_code == 2 and "leave out --head" in result.output


@pytest.mark.slow
def test_sample_of_a_briefly_trained_model_speaks_the_corpus_words(tmp_path):
    """A small network trained for ~700 steps on the generated corpus (entropy rate 0.2 bits/char)
    samples mostly words the corpus's source knows: the vocabulary, the step API and the
    decoding fit together. About 30 s."""
    import re

    from elmcore.data.text import generate_text
    from elmcore.training.train import Trainer, TrainSettings
    generate_text(tmp_path / "corpus", num_chars=20_000, seed=0)
    words = set(json.loads((tmp_path / "corpus" / "corpus.json").read_text())["words"])
    settings = TrainSettings(task="text", data_dir=str(tmp_path / "corpus"), task_options={"length": 32},
                             model=dict(version="elm_network", num_neurons=32, num_memory=4, num_branch=4,
                                        num_synapse_per_branch=4, recurrent_fraction=0.5, memory_tau_max=50.0),
                             epochs=20, batch_size=16, lr=2e-2, run_dir=str(tmp_path / "run"))
    Trainer(settings, progress=False, log=lambda m: None).run()
    args = ("sample", tmp_path / "run", "--length", "300", "--temperature", "0.7", "--seed", "1")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert invoke(*args).output == result.output
    sampled = [w for w in re.split(r"[ .\n]+", result.output)[:-1] if w]
    assert len(sampled) >= 30
    assert np.mean([w in words for w in sampled]) >= 0.8, result.output
