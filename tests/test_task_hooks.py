"""Tasks own their special cases (loss, evaluation, output heads) and optional packages stay optional."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import elmcore
from elm_cli.main import cli
from elmcore import ELM, ELMConfig
from elmcore.training.checkpoint import save_model
from elmcore.data import registry
from elmcore.data.base import ArrayTask, OutputHead
from elmcore.errors import ELMError
from elmcore.engine.optional import MissingDependency
from elmcore.training.predict import head_names, predict_array
from elmcore.training.train import Trainer, TrainSettings

GENERIC_MODULES = ("training/train.py", "training/evaluate.py", "training/predict.py", "training/losses.py",
                   "reporting/plotting.py")


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_modules_never_name_a_task(module):
    source = (pathlib.Path(elmcore.__file__).parent / module).read_text().lower()
    assert "neuronio" not in source and "listops" not in source
    assert "simulation_groups" not in source and ".loss ==" not in source and ".name ==" not in source


class RecordingTask(ArrayTask):
    """A classification task whose hooks record how the trainer calls them."""

    def __init__(self):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(24, 5, 2)).astype(np.float32)
        y = (X[:, :, 0].sum(1) > 0).astype(np.int64)
        super().__init__("recording", {"train": (X[:16], y[:16]), "valid": (X[16:], y[16:])}, num_output=2,
                         defaults={"num_memory": 3, "mlp_hidden_size": 4})
        self.loss_calls, self.validation_calls = [], []

    def loss_and_grad(self, Y, target, **train_options):
        self.loss_calls.append(train_options)
        return super().loss_and_grad(Y, target, **train_options)

    def validation_metrics(self, model, split, batch_size=64, max_batches=None, comm=None):
        self.validation_calls.append((split, batch_size, max_batches))
        return super().validation_metrics(model, split, batch_size, max_batches, comm=comm)


def test_the_trainer_asks_the_task_for_its_loss_and_validation(tmp_path):
    task = RecordingTask()
    settings = TrainSettings(task="recording", epochs=2, batch_size=8, burn_in=3, eval_batch_size=5,
                             valid_max_batches=1, run_dir=str(tmp_path / "run"))
    summary = Trainer(settings, task=task, progress=False, log=lambda m: None).run()
    assert summary["steps"] == 4
    # 4 training steps with the run's burn-in, then validation batches (no train options).
    assert task.loss_calls[:2] == [{"burn_in": 3}, {"burn_in": 3}]
    assert task.validation_calls == [("valid", 5, 1), ("valid", 5, 1)]


def test_a_task_without_evaluation_options_refuses_them():
    task = RecordingTask()
    model = ELM(ELMConfig(num_input=2, num_output=2, num_memory=3, mlp_hidden_size=4))
    assert task.evaluate(model, "valid")["examples"] == 8
    with pytest.raises(ELMError, match="takes no evaluation option.*window"):
        task.evaluate(model, "valid", window=5)


def test_a_task_naming_an_unknown_loss_says_so():
    task = ArrayTask("odd", {"train": (np.zeros((2, 3, 1), np.float32), np.zeros(2))}, num_output=1, loss="hinge")
    with pytest.raises(ELMError, match="names the loss 'hinge'.*overrides loss_and_grad"):
        task.loss_and_grad(np.zeros((2, 3, 1)), np.zeros(2))


def test_elm_eval_gives_window_options_only_to_tasks_that_take_them(tmp_path):
    cfg = ELMConfig(num_input=2, num_output=1, num_memory=3, mlp_hidden_size=4)
    model = ELM(cfg)
    save_model(tmp_path / "m.npz", cfg, model.state_dict())
    base = ["eval", str(tmp_path / "m.npz"), "--task", "adding", "--task-option", "n=20",
            "--task-option", "length=6", "--split", "test"]
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, base + ["--window", "100"])
    assert result.exit_code == 2 and "takes no evaluation option(s) window" in result.output


def test_neuronio_hooks_are_its_loss_and_the_release_protocol(tmp_path):
    from elmcore.data.neuronio import NeuronIOTask, evaluate_neuronio, neuronio_loss, write_neuronio_file
    rng = np.random.default_rng(1)
    for k in range(3):
        sims = [{"exInputSpikeTimes": {0: sorted(rng.choice(40, 5, replace=False).tolist())},
                 "inhInputSpikeTimes": {1: [3, 30]}, "outputSpikeTimes": [4.5, 20.5],
                 "somaVoltageLowRes": rng.uniform(-80, -50, 40)} for _ in range(2)]
        write_neuronio_file(tmp_path / f"a_sim__{k}.p", {"allSegmentsType": ["b"] * 2,
                                                         "totalSimDurationInSec": 0.04}, sims)
    task = NeuronIOTask(tmp_path, window=20, burn_in=5, valid_fraction=0.34, test_fraction=0.34)
    Y = rng.normal(size=(2, 20, 2))
    target = np.stack([rng.random((2, 20)) < 0.2, rng.normal(size=(2, 20))], -1).astype(np.float64)
    loss, dY = task.loss_and_grad(Y, target, burn_in=4)
    ref_loss, ref_dY = neuronio_loss(Y, target, burn_in=4)
    assert loss == ref_loss and np.array_equal(dY, ref_dY)

    model = ELM(ELMConfig(num_input=4, num_output=2, num_memory=2, mlp_hidden_size=3), dtype="float64")
    by_hook = task.evaluate(model, "test", batch_size=7)
    assert by_hook == evaluate_neuronio(model, task, "test", window=20, burn_in=5, batch_size=7)
    options = task.evaluate(model, "test", window=10, burn_in=2, align=False)
    assert options == evaluate_neuronio(model, task, "test", window=10, burn_in=2, align=False)
    assert task.validation_metrics(model, "valid") == evaluate_neuronio(model, task, "valid", window=20,
                                                                       burn_in=5, max_files=1)
    with pytest.raises(ELMError, match="max_files"):
        task.evaluate(model, "test", max_batches=2)


def test_predict_heads_are_declared_by_the_registry(monkeypatch):
    assert head_names() == ("raw", "neuronio")
    model = ELM(ELMConfig(num_input=2, num_output=1, num_memory=2, mlp_hidden_size=3), dtype="float64")
    X = np.random.default_rng(0).normal(size=(2, 4, 2))
    raw = predict_array(model, X)
    with pytest.raises(ELMError, match="neuronio head needs a model with at least 2 outputs"):
        predict_array(model, X, head="neuronio")
    spec = registry.TASKS["adding"]
    negated = OutputHead("negated", "minus the outputs", ("numpy", "negative"))
    monkeypatch.setitem(registry.TASKS, "adding", type(spec)(**{**spec.__dict__, "heads": (negated,)}))
    assert "negated" in head_names()
    np.testing.assert_array_equal(predict_array(model, X, head="negated"), -raw)


# ---- optional packages -----------------------------------------------------------------------

def test_missing_h5py_names_the_extra(monkeypatch, tmp_path):
    from elmcore.data.shd import read_shd_h5
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(MissingDependency, match=r"SHD.*pip install 'elmcore\[shd\]'"):
        read_shd_h5(tmp_path / "shd_train.h5")


def test_missing_pillow_names_the_extra(monkeypatch, tmp_path):
    from elmcore.data.pathfinder import load_grey_png
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.delitem(sys.modules, "PIL.Image", raising=False)
    with pytest.raises(MissingDependency, match=r"Pathfinder.*pip install 'elmcore\[images\]'"):
        load_grey_png(tmp_path / "x.png", 32)


@pytest.mark.parametrize("blocked, args, extra", [
    ("h5py", ["data", "info", "{dir}", "--task", "shd"], "shd"),
    ("PIL", ["data", "generate", "pathfinder", "--out", "{dir}", "--n", "4"], "images"),
])
def test_elm_without_an_optional_package_prints_one_error_line(tmp_path, blocked, args, extra):
    for name in ("shd_train.h5", "shd_test.h5"):
        (tmp_path / name).write_bytes(b"")
    code = (f"import sys; sys.modules[{blocked!r}] = None; from elm_cli.main import main; "
            "sys.argv = ['elm'] + sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", code, *[a.format(dir=tmp_path) for a in args]],
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and f"pip install 'elmcore[{extra}]'" in lines[0]
