"""The training loop: learning, checkpoints, bit-identical resume, divergence handling."""

import json
import os
import signal

import numpy as np
import pytest

from elmcore.training.checkpoint import load_file
from elmcore.data.base import ArrayTask
from elmcore.errors import DataError
from elmcore.training.train import Trainer, TrainingDiverged, TrainSettings
from helpers import run_killed_after


def sign_task(n=96, T=12, D=3, seed=0):
    """Label = whether input channel 0 summed over time is positive: needs memory of the whole sequence."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, T, D)).astype(np.float32)
    y = (X[:, :, 0].sum(1) > 0).astype(np.int64)
    cut = int(0.75 * n)
    return ArrayTask("sign", {"train": (X[:cut], y[:cut]), "valid": (X[cut:], y[cut:])}, num_output=2,
                     defaults={"num_memory": 6, "mlp_hidden_size": 12, "memory_tau_max": 50.0,
                               "version": "branch_elm_v2"})


def settings(tmp_path, name="run", **kw):
    base = dict(task="sign", epochs=3, batch_size=16, lr=3e-3, checkpoint_every=2, input_dropout=0.1,
                run_dir=str(tmp_path / name))
    base.update(kw)
    return TrainSettings(**base)


def run(tmp_path, name="run", task=None, **kw):
    return Trainer(settings(tmp_path, name, **kw), task=task or sign_task(), progress=False,
                   log=lambda m: None).run()


def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path):
    summary = run(tmp_path, epochs=6, lr=1e-2)
    rd = tmp_path / "run"
    for name in ("run.json", "last.npz", "best.npz", "metrics.jsonl", "summary.json"):
        assert (rd / name).exists(), name
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "step"]
    assert len(losses) == summary["steps"] == 6 * 5
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 6 and all(r["split"] == "valid" and "accuracy" in r["metrics"] for r in epochs)
    assert summary["selection_split"] == "valid"
    assert summary["best_metric"] == max(r["metrics"]["accuracy"] for r in epochs)
    ckpt = load_file(rd / "last.npz")
    assert ckpt.kind == "elmcore-checkpoint" and ckpt.meta["step"] == 30
    assert set(ckpt.optim_state) >= {"t", "exp_avg/w_y.weight"}


def test_same_seed_same_parameters(tmp_path):
    run(tmp_path, "a")
    run(tmp_path, "b")
    a, b = load_file(tmp_path / "a" / "last.npz"), load_file(tmp_path / "b" / "last.npz")
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("kill_after", [3, 5, 7])
def test_kill_and_resume_is_bit_identical(tmp_path, kill_after):
    run(tmp_path, "full")
    trainer = Trainer(settings(tmp_path, "killed"), task=sign_task(), progress=False, log=lambda m: None)
    run_killed_after(trainer, kill_after)
    resumed = Trainer.resume(str(tmp_path / "killed"), task=sign_task(), progress=False, log=lambda m: None)
    summary = resumed.run()
    assert summary["steps"] == 15
    full, again = load_file(tmp_path / "full" / "last.npz"), load_file(tmp_path / "killed" / "last.npz")
    for k in full.params:
        assert np.array_equal(full.params[k], again.params[k]), k
    for k in full.optim_state:
        assert np.array_equal(full.optim_state[k], again.optim_state[k]), k
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 16))  # no duplicates from the replayed steps


def test_nan_in_data_is_a_data_error(tmp_path):
    task = sign_task()
    task.splits["train"][0][5, 3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        run(tmp_path, task=task)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(settings(tmp_path, checkpoint_every=1), task=sign_task(), progress=False, log=lambda m: None)
    real_forward = None

    def poisoned(X, return_cache=False, state=None):
        Y, cache = real_forward(X, return_cache=True, state=state)
        if trainer.position["step"] >= 4:
            Y = Y * np.float32(np.inf)
        return (Y, cache) if return_cache else Y

    trainer_model_init = trainer._new_state

    def new_state():
        nonlocal real_forward
        trainer_model_init()
        real_forward = trainer.model._forward_unchecked = trainer.model.forward
        trainer.model.forward = poisoned

    trainer._new_state = new_state
    with pytest.raises(TrainingDiverged, match=r"step 5.*last good checkpoint .*last.npz \(step 4\)"):
        trainer.run()
    ckpt = load_file(tmp_path / "run" / "last.npz")
    assert ckpt.meta["step"] == 4
    assert all(np.all(np.isfinite(v)) for v in ckpt.params.values() if v.dtype.kind == "f")


def test_impossible_settings(tmp_path):
    with pytest.raises(Exception, match="batch_size"):
        Trainer(settings(tmp_path, batch_size=0), task=sign_task())
    with pytest.raises(Exception, match="unknown training setting"):
        TrainSettings.from_dict({"epochz": 3})
    with pytest.raises(Exception, match="num_input"):
        Trainer(settings(tmp_path, model={"num_input": 5}), task=sign_task()).run()


def test_existing_run_is_not_overwritten(tmp_path):
    run(tmp_path, epochs=1)
    before = (tmp_path / "run" / "last.npz").read_bytes()
    with pytest.raises(Exception, match="already holds a run"):
        run(tmp_path, epochs=1)
    assert (tmp_path / "run" / "last.npz").read_bytes() == before


# ---- stateful tasks (truncated BPTT) ------------------------------------------------------------

def text_settings(tmp_path, corpus, name, **kw):
    base = dict(task="text", data_dir=str(corpus), task_options={"length": 16, "stateful": True},
                model={"num_memory": 4, "mlp_hidden_size": 6, "num_branch": 3, "num_synapse_per_branch": 2,
                       "input_to_synapse_routing": "random_routing", "memory_tau_max": 20.0},
                epochs=2, batch_size=4, batches_per_epoch=6, lr=1e-2, checkpoint_every=2, eval_batch_size=4,
                valid_max_batches=2, run_dir=str(tmp_path / name))
    base.update(kw)
    return TrainSettings(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from elmcore.data.text import generate_text
    out = tmp_path_factory.mktemp("stateful_corpus")
    generate_text(out, num_chars=3000, seed=1)
    return out


def test_stateful_training_carries_the_state_within_an_epoch(tmp_path, corpus, monkeypatch):
    """Each batch starts from the final state of the batch before it (the same arrays), every epoch
    from the zero state; the run records its vocabulary, units and reference levels, and its log
    and plot say them."""
    # The compile warm-up's passes (from the zero state, before the clock starts) are not batches.
    monkeypatch.setattr("elmcore.training.train.warm_up", lambda *args, **kwargs: None)
    logged = []
    trainer = Trainer(text_settings(tmp_path, corpus, "run"), progress=False, log=logged.append)
    assert trainer.task.stateful
    calls = []
    new_state = trainer._new_state

    def recording_new_state():
        new_state()
        real_forward = trainer.model.forward

        def forward(X, return_cache=False, state=None):
            Y, cache = real_forward(X, return_cache=True, state=state)
            calls.append((trainer.position["epoch"], state, cache["final_state"]))
            return (Y, cache) if return_cache else Y
        trainer.model.forward = forward

    trainer._new_state = recording_new_state
    trainer.run()
    assert len(calls) == 12
    for i, (epoch, state, _) in enumerate(calls):
        if i % 6 == 0:
            assert state is None, i
        else:
            assert state is calls[i - 1][2] and calls[i - 1][0] == epoch, i
            assert np.any(state["m"] != 0)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    info = recorded["task_info"]
    assert info["vocab"] == trainer.task.vocabulary.to_list()
    assert set(info["references"]) == {"unigram entropy (train split)", "generator entropy rate"}
    for name in ("best.npz", "last.npz"):
        assert load_file(tmp_path / "run" / name).vocab == trainer.task.vocabulary
    units = next(line for line in logged if "loss in nats/char" in line)
    assert "bpc in bits/char" in units and "generator entropy rate" in units and "unigram entropy" in units
    epoch_lines = [line for line in logged if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("nats/char" in line and "bits/char" in line for line in epoch_lines)
    from elmcore.reporting.plotting import _recorded_units, plot_run
    assert _recorded_units(recorded) == ("nats/char", "bits/char", info["references"])
    pytest.importorskip("matplotlib")
    assert plot_run(tmp_path / "run").endswith("curves.png") and (tmp_path / "run" / "curves.png").stat().st_size


@pytest.mark.parametrize("kill_after", [3, 8])
def test_stateful_kill_and_resume_is_bit_identical(tmp_path, corpus, kill_after):
    """A checkpoint taken mid-epoch holds the carried state: the resumed run goes on from it."""
    Trainer(text_settings(tmp_path, corpus, "full"), progress=False, log=lambda m: None).run()
    trainer = Trainer(text_settings(tmp_path, corpus, "killed"), progress=False, log=lambda m: None)
    run_killed_after(trainer, kill_after)
    interrupted = load_file(tmp_path / "killed" / "last.npz")
    assert interrupted.meta["position"]["batch"] > 0 and set(interrupted.state) == {"u", "m"}
    summary = Trainer.resume(str(tmp_path / "killed"), progress=False, log=lambda m: None).run()
    assert summary["steps"] == 12
    full, again = load_file(tmp_path / "full" / "last.npz"), load_file(tmp_path / "killed" / "last.npz")
    for k in full.params:
        assert np.array_equal(full.params[k], again.params[k]), k


def test_a_ctrl_c_during_a_checkpoint_write_names_that_checkpoint(tmp_path, monkeypatch):
    """The interrupt is held until the file is in place; it was delivered before the trainer recorded the
    step, so the resume line named the checkpoint before the one on disk (seen in CI: "step 20" for 30)."""
    from elmcore.training import train as train_module
    real_save = train_module.save_checkpoint
    trainer = Trainer(settings(tmp_path), task=sign_task(), progress=False, log=lambda m: None)

    def interrupted_save(*args, **kwargs):
        if trainer.position["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    on_disk = load_file(tmp_path / "run" / "last.npz").meta["step"]
    assert on_disk == 4
    assert f"last.npz (step {on_disk})" in trainer.interrupted_message()
