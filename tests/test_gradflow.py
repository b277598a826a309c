"""`elm gradflow`: the BPTT adjoints' batch norms per step and unit, from the reference walk."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import _eval_settings, _eval_target, _eval_task, cli
from elmcore.reporting import gradflow as GF
from elmcore.training.checkpoint import load_model
from elmcore.verification import reference

LENGTH = 12


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def adding_run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("gradflow") / "run"
    result = invoke("train", "--task", "adding", "--task-option", "n=200", "--task-option", f"length={LENGTH}",
                    "--set", "num_memory=6", "--set", "version=branch_elm_v2", "--epochs", "2",
                    "--batch-size", "16", "--run-dir", rd, "--quiet")
    assert result.exit_code == 0, result.output
    return rd


def _run_batch(rd, batch_size):
    """The model, batch and task `elm gradflow RUN_DIR` reads, through the same CLI helpers."""
    model_path, run, _ = _eval_target(str(rd), "best")
    task, data_dir, options, seed = _eval_settings(model_path, run, None, None, (), None)
    model = load_model(model_path, dtype="float64")
    t = _eval_task(model, run, task, data_dir, options, seed)
    return model, next(iter(t.batches("test", batch_size))), t


def _direct_norms(model, X, target, task):
    Y, trace = reference.forward(model.config, model.state_dict(), X)
    _, dY = task.loss_and_grad(Y, target)
    reference.backward(model.config, model.state_dict(), trace, dY)
    return trace, dY


@pytest.mark.slow
def test_gradflow_of_an_adding_run_reaches_back_to_the_markers(adding_run):
    result = invoke("gradflow", adding_run, "--batch-size", "6")
    assert result.exit_code == 0, result.output
    png, csv_path = adding_run / "gradflow.png", adding_run / "gradflow.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = GF.read_csv(csv_path)["m"]
    model, batch, task = _run_batch(adding_run, 6)
    Dm = model.config.num_memory
    assert len(rows) == LENGTH * Dm
    norms = np.zeros((LENGTH, Dm))
    for t, unit, tau, norm in rows:
        norms[t, unit] = norm
    # The loss reads only the last step: that is where dY enters, and the adjoint is non-zero there.
    trace, dY = _direct_norms(model, batch.X, batch.target, task)
    assert np.flatnonzero(np.abs(dY).sum((0, 2))).tolist() == [LENGTH - 1]
    loss_step = np.sqrt((norms[LENGTH - 1] ** 2).sum())
    assert loss_step > 0
    # Every marker (channel 1 of the input), the early ones in the first half included, gets a clearly
    # non-zero share of the gradient: the sequence's own adjoint there is within a few decades of its loss step's.
    marked = np.argwhere(batch.X[:, :, 1] == 1)
    assert len(marked) == 2 * len(batch.X)
    adjoint = trace["adjoint_m"]
    for b, t in marked:
        own = np.linalg.norm(adjoint[b, t])
        assert own > 1e-3 * np.linalg.norm(adjoint[b, LENGTH - 1]), (b, t)
    step_norms = np.sqrt((norms ** 2).sum(1))
    assert np.all(step_norms[np.unique(marked[:, 1])] > 1e-3 * loss_step)


@pytest.mark.slow
def test_gradflow_csv_is_the_reference_trace(adding_run, tmp_path):
    prefix = tmp_path / "flow"
    result = invoke("gradflow", adding_run, "--batch-size", "5", "--out", prefix)
    assert result.exit_code == 0, result.output
    assert os.path.exists(f"{prefix}.png")
    rows = GF.read_csv(f"{prefix}.csv")["m"]
    model, batch, task = _run_batch(adding_run, 5)
    trace, _ = _direct_norms(model, batch.X, batch.target, task)
    direct = np.sqrt((trace["adjoint_m"] ** 2).sum(axis=0))           # (T, Dm)
    tau = trace["derived"]["tau_m"]
    order = [unit for t, unit, _, _ in rows if t == 0]
    assert order == np.argsort(tau, kind="stable").tolist()               # units by τ_m, shortest first
    assert np.all(np.diff([r[2] for r in rows if r[0] == 0]) >= 0)
    for t, unit, tau_m, norm in rows:
        assert tau_m == tau[unit]
        assert norm == pytest.approx(direct[t, unit], rel=1e-12, abs=1e-300)


def _network_model(tmp_path):
    from elmcore.engine.factory import build_model
    from elmcore.neuron.config import ELMConfig
    from elmcore.training.checkpoint import save_model
    cfg = ELMConfig.from_dict({"num_input": 2, "num_output": 1, "version": "elm_network", "num_neurons": 3,
                               "num_layers": 2, "num_memory": 2, "num_branch": 2, "num_synapse_per_branch": 2})
    model = build_model(cfg, seed=0, dtype="float64")
    path = tmp_path / "net.npz"
    save_model(path, cfg, model.state_dict())
    return path


def test_gradflow_of_a_network(tmp_path):
    path = _network_model(tmp_path)
    result = invoke("gradflow", path, "--task", "adding", "--task-option", "n=40", "--task-option", "length=7",
                    "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "net.gradflow.png")
    table = GF.read_csv(tmp_path / "net.gradflow.csv")
    assert sorted(table) == ["layers.0.m", "layers.0.o", "layers.1.m", "layers.1.o"]
    from elmcore.data.registry import get_task
    task = get_task("adding", seed=0, n=40, length=7)
    batch = next(iter(task.batches("test", 4)))
    model = load_model(path, dtype="float64")
    trace, _ = _direct_norms(model, batch.X, batch.target, task)
    for layer in (0, 1):
        direct_o = np.sqrt((trace[f"layers.{layer}.adjoint_o"] ** 2).sum(0))        # (T, N)
        rows = table[f"layers.{layer}.o"]
        assert len(rows) == 7 * 3 and all(tau is None for _, _, tau, _ in rows)
        for t, unit, _, norm in rows:
            assert norm == pytest.approx(direct_o[t, unit], rel=1e-12, abs=1e-300)
        direct_m = np.sqrt((trace[f"layers.{layer}.adjoint_m"] ** 2).sum(0)).reshape(7, -1)   # unit = n·Dm + d
        tau = trace[f"layers.{layer}.derived"]["tau_m"].reshape(-1)
        rows = table[f"layers.{layer}.m"]
        assert len(rows) == 7 * 6
        for t, unit, tau_m, norm in rows:
            assert tau_m == tau[unit] and norm == pytest.approx(direct_m[t, unit], rel=1e-12, abs=1e-300)
    # The first layer's adjoint gets there only through the second: both reach step 0.
    assert all(norm > 0 for t, _, _, norm in table["layers.0.o"] if t == 0)


def test_gradflow_library_dY_at_one_step():
    """dY given directly: nothing flows to steps after the loss step, and the decay starts at it."""
    from elmcore.engine.factory import build_model
    from elmcore.neuron.config import ELMConfig
    cfg = ELMConfig.from_dict({"num_input": 2, "num_output": 1, "num_memory": 3, "version": "branch_elm_v2",
                               "num_branch": 2, "num_synapse_per_branch": 1, "memory_tau_max": 20.0})
    model = build_model(cfg, seed=1, dtype="float64")
    X = np.random.default_rng(0).normal(size=(3, 9, 2))
    dY = np.zeros((3, 9, 1))
    dY[:, 5] = 1.0
    flow = GF.gradient_flow(model, X, dY=dY)
    assert flow.loss_steps.tolist() == [5] and flow.last_loss_step == 5
    (field,) = flow.fields
    assert np.all(field.norms[6:] == 0) and np.all(field.norms[:6] > 0)
    distance, norms = flow.decay(field)
    assert distance.tolist() == list(range(6)) and norms[0] == pytest.approx(np.linalg.norm(field.norms[5]))


def test_gradflow_refuses_bad_input(tmp_path, monkeypatch):
    def refused(*args, message):
        result = invoke("gradflow", *args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output

    refused(tmp_path / "no-such-run", message="no-such-run")
    path = _network_model(tmp_path)
    refused(path, message="name its task with --task")
    refused(path, "--task", "delayed-recall", "--task-option", "length=5", message="inputs")
    before = path.read_bytes()
    os.symlink(path, tmp_path / "out.csv")
    refused(path, "--task", "adding", "--task-option", "length=5", "--out", tmp_path / "out",
            message="refusing to write")
    assert path.read_bytes() == before and not os.path.exists(tmp_path / "out.png")
    monkeypatch.setattr(GF, "MAX_TRACE_BYTES", 10_000)
    refused(path, "--task", "adding", "--task-option", "length=50", "--batch-size", "8", message="lower the batch size")
    result = invoke("gradflow", path, "--task", "adding", "--batch-size", "0")
    assert result.exit_code == 2
