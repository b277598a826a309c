"""One resolution of a run's settings: a model-family switch starts from that family's default run,
the start-up line names where every non-default setting came from, and a sweep point is exactly the
run `elm train --config` makes from the same table."""

import json
import re

import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.data import registry
from elmcore.errors import ELMError
from elmcore.training.resolve import describe_sources, non_default, resolve_layers
from elmcore.training.train import TrainSettings

TINY = {"task": "adding", "task_options": {"n": 60, "length": 8}, "epochs": 1, "batch_size": 16}


def test_every_task_has_a_network_run_that_says_what_it_reaches():
    for name, spec in registry.TASKS.items():
        runs = {run.family: run for run in spec.default_runs}
        assert "network" in runs, name
        network = runs["network"]
        assert network.settings["model"]["version"] == "elm_network"
        assert network.reaches.strip(), name
        TrainSettings.from_dict({**network.settings, "task": name})  # every setting is a valid one
    with pytest.raises(ValueError, match="may not set version"):
        registry.DefaultRun("neuron", {"model": {"version": "elm_network"}})
    with pytest.raises(ValueError, match="family"):
        registry.DefaultRun("brain", {})


@pytest.mark.parametrize("task", ["adding", "text"])
def test_a_network_run_starts_from_the_tasks_network_run_not_the_neurons(task):
    network = registry.find_default_run(task, "network").settings
    r = resolve_layers([("flags", {"task": task, "model": {"version": "elm_network", "num_neurons": 5}})])
    assert r.family == "network"
    assert r.settings.model == {**network["model"], "num_neurons": 5}
    assert r.settings.lr == network["lr"] and r.settings.epochs == network.get("epochs", TrainSettings.epochs)
    neuron = registry.find_default_run(task, "neuron")
    if neuron is not None:  # nothing of the single neuron's run leaks into the network's
        for key, value in neuron.settings.get("model", {}).items():
            if key not in network["model"]:
                assert key not in r.settings.model
    # A run that names no version is the task's single-neuron experiment, as before.
    plain = resolve_layers([("flags", {"task": task})])
    assert plain.family == "neuron" and plain.settings.model.get("version") != "elm_network"


def test_the_adding_networks_model_keeps_the_network_defaults_it_does_not_set():
    """`elm train --set version=elm_network --set num_neurons=64` builds the network's num_memory, not 30."""
    from elmcore.network.config import NetworkConfig
    from elmcore.training.train import run_model_config
    from elmcore.data.registry import get_task
    r = resolve_layers([("flags", {"model": {"version": "elm_network", "num_neurons": 64}})])
    config = run_model_config(get_task("adding", n=20, length=5), r.settings.model)
    assert isinstance(config, NetworkConfig) and config.num_neurons == 64
    for field in ("num_memory", "memory_tau_max"):
        expected = r.settings.model.get(field, NetworkConfig.__dataclass_fields__[field].default)
        assert getattr(config, field) == expected
    assert config.num_memory != 30 and config.memory_tau_max != 500.0


def test_later_layers_win_field_by_field_and_remember_their_source():
    layers = [("config file run.toml", {"epochs": 3, "lr": 0.1, "model": {"num_memory": 7, "mlp_hidden_size": 4}}),
              ("flags", {"lr": 0.2, "model": {"num_memory": 9}})]
    r = resolve_layers(layers)
    assert r.settings.lr == 0.2 and r.settings.epochs == 3
    assert r.settings.model["num_memory"] == 9 and r.settings.model["mlp_hidden_size"] == 4
    assert r.settings.model["version"] == "branch_elm_v2"  # from the adding task's neuron run
    assert r.sources["lr"] == "flags" and r.sources["epochs"] == "config file run.toml"
    assert r.sources["model.num_memory"] == "flags"
    assert r.sources["model.version"] == "task adding's default neuron run"
    line = describe_sources(r)
    groups = dict((m.group(2), m.group(1)) for m in re.finditer(r"([^;]+?) \(from ([^)]+)\)", line))
    assert set(groups) == {"task adding's default neuron run", "config file run.toml", "flags"}
    assert list(groups) == ["task adding's default neuron run", "config file run.toml", "flags"]
    assert "lr=0.2" in groups["flags"] and "model.num_memory=9" in groups["flags"]
    assert "epochs=3" in groups["config file run.toml"] and "lr=0.1" not in line
    # Every non-default setting is named once, with its final value.
    assert sum(len(g.split(", ")) for g in groups.values()) == len(non_default(r.settings))
    with pytest.raises(ELMError, match=r"'model' must be a table.*\(config file bad.toml\)"):
        resolve_layers([("config file bad.toml", {"model": [1, 2]})])


def _groups(line):
    """{source: [KEY=VALUE, ...]} of a start-up line."""
    return {m.group(2): m.group(1).strip().removeprefix("settings: ").split(", ")
            for m in re.finditer(r"([^;]+?) \(from ([^)]+)\)", line)}


def test_the_start_up_line_names_the_source_of_every_setting(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\nbatch_size = 16\n[task_options]\nn = 60\nlength = 8\n')
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--set", "version=elm_network",
                                      "--set", "num_neurons=3", "--seed", "4", "--quiet",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("settings: "))
    groups = _groups(line)
    network = registry.find_default_run("adding", "network").settings
    assert list(groups) == ["task adding's default network run", f"config file {config}", "flags"]
    assert groups["task adding's default network run"] == [f"lr={network['lr']}"]
    assert sorted(groups[f"config file {config}"]) == ["batch_size=16", "epochs=1", "task_options.length=8",
                                                       "task_options.n=60"]
    assert sorted(groups["flags"]) == ["model.num_neurons=3", "model.version=elm_network",
                                       f"run_dir={tmp_path / 'run'}", "seed=4"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["lr"] == network["lr"] and run["model"] == {"version": "elm_network", "num_neurons": 3}
    assert run["task_options"] == {"length": 8, "n": 60} and run["seed"] == 4


@pytest.mark.parametrize("model", [{"mlp_hidden_size": 4}, {"version": "elm_network", "num_neurons": 3}],
                         ids=["neuron", "network"])
def test_a_sweep_point_is_the_run_elm_train_config_makes(tmp_path, model):
    """A point of `[base] task = "adding"` gets the task's default run layered under it, exactly as
    `elm train --config` does with the same table: their run.json agree but for the run directory."""
    base = {**TINY, "model": model}
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"sweep_dir": str(tmp_path / "sw"), "base": base,
                                      "grid": {"seed": [2]}}))
    runner = CliRunner()
    swept = runner.invoke(cli, ["sweep", str(sweep_file)])
    assert swept.exit_code == 0, swept.output
    point_dir = tmp_path / "sw" / "p000"
    assert "point p000 done: valid mse " in swept.output and " s" in swept.output.split("point p000 done")[1]
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({**base, "seed": 2}))
    trained = runner.invoke(cli, ["train", "--config", str(run_file), "--quiet", "--run-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    point_run = json.loads((point_dir / "run.json").read_text())
    train_run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert point_run.pop("run_dir") == str(point_dir) and train_run.pop("run_dir") == str(tmp_path / "run")
    assert point_run == train_run
    family = "network" if model.get("version") == "elm_network" else "neuron"
    default = registry.find_default_run("adding", family).settings
    assert point_run["model"] == {**default.get("model", {}), **model}  # the task's default run is under it
    assert point_run["lr"] == default["lr"] and point_run["epochs"] == 1 and point_run["seed"] == 2
    point_log = (point_dir / "train.log").read_text()
    assert f"(from task adding's default {family} run)" in point_log and "(from sweep file)" in point_log
    assert re.search(r"; seed=2 \(from sweep point p000\)", point_log), point_log
    summaries = [json.loads(p.read_text()) for p in (point_dir / "summary.json", tmp_path / "run" / "summary.json")]
    assert summaries[0]["parameters"] == summaries[1]["parameters"]
