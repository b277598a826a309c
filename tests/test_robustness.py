"""Hostile and careless input to every ``elm`` command: exit 2, one ``error:`` line, no traceback, no damage.

Also the file-writing promises (symlinks, FIFOs, device nodes, modes, umask,
outputs that are inputs, full or read-only disks), the size guards, the type
checks of run configs and task options, and the training faults (divergence,
two trainers on one directory, stale temporaries, resumed epoch averages).
"""

import errno
import json
import os
import shutil
import signal
import stat
import tempfile
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from elm_cli.main import cli
from elmcore.storage import fileio as fileio
from elmcore.training.checkpoint import load_file, load_model, save_model
from elmcore.engine import memory as memory_module
from elmcore.neuron.config import ELMConfig
from elmcore.engine.memory import check_memory
from elmcore.data.registry import get_task
from elmcore.errors import ELMError
from elmcore.neuron.model import ELM
from elmcore.neuron.params import expected_shapes
from elmcore.training.train import RUN_FILES, Trainer, TrainingDiverged, TrainSettings, _lock_run_dir

from helpers import REFERENCE_DIR, run_killed_after

TINY_ADDING = ["--task", "adding", "--task-option", "n=40", "--task-option", "length=6",
               "--set", "num_memory=3", "--batch-size", "8", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *needles):
    """Exit 2, exactly one error line, no traceback, and the message names what is wrong."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if fileio.TEMP_MARK in name)


# ---- safe output writes -----------------------------------------------------------------

def test_symlink_output_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    fileio.atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_fifo_output_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    fileio.atomic_write_bytes(fifo, b"through the pipe")
    reader.join(timeout=20)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_device_node_output_is_written_through_not_replaced(tmp_path):
    node = tmp_path / "null"
    try:  # our own node with the numbers of the null device: the system's /dev/null is never touched
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here ({e})")
    link = tmp_path / "out.npy"
    link.symlink_to(node)
    with fileio.atomic_output(link, suffix=".npy") as tmp:
        np.save(tmp, np.arange(10))
    assert stat.S_ISCHR(os.lstat(node).st_mode) and link.is_symlink()
    assert leftovers(tmp_path) == []


def test_a_ctrl_c_in_the_middle_of_a_write_waits_until_the_file_is_in_place(tmp_path):
    """np.savez interrupted inside its zip raised ValueError ("Can't close the ZIP file ...") instead of
    KeyboardInterrupt, and a training run ended in a traceback instead of its resume line."""
    path = tmp_path / "ckpt.npz"
    arrays = {f"a{i}": np.arange(1000.0) + i for i in range(20)}
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_output(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **dict(list(arrays.items())[:10]))
                os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
                f.seek(0)
                np.savez(f, **arrays)
    with np.load(path) as saved:  # complete, in place, before the interrupt was delivered
        assert sorted(saved.files) == sorted(arrays) and np.array_equal(saved["a19"], arrays["a19"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]


def test_interrupts_deferred_hands_the_signal_to_the_handler_that_was_in_place():
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with fileio.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with fileio.interrupts_deferred():  # an ignored SIGINT stays ignored
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc")
def test_dev_stdout_is_written_at_the_descriptor_not_replaced(tmp_path):
    import subprocess
    import sys
    script = ("from elmcore.storage.fileio import atomic_write_text\n"
              "print('before', flush=True)\n"
              "atomic_write_text('/dev/stdout', 'json\\n')\n"
              "atomic_write_text('/dev/fd/1', 'again\\n')\n"
              "print('after', flush=True)\n")
    out = tmp_path / "captured.txt"
    with open(out, "wb") as f:
        inode = os.fstat(f.fileno()).st_ino
        subprocess.run([sys.executable, "-c", script], stdout=f, check=True, timeout=60)
    assert out.read_text() == "before\njson\nagain\nafter\n"
    assert os.stat(out).st_ino == inode  # the same file, not one renamed over it
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, timeout=60)
    assert piped.stdout == b"before\njson\nagain\nafter\n"


def test_existing_file_keeps_its_mode_and_new_files_follow_the_umask(tmp_path):
    kept = tmp_path / "shared.json"
    kept.write_text("{}")
    os.chmod(kept, 0o644)
    old = os.umask(0o077)
    try:
        fileio.atomic_write_text(kept, "[]")
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o644
        fileio.atomic_write_text(tmp_path / "private.json", "[]")
        assert stat.S_IMODE(os.stat(tmp_path / "private.json").st_mode) == 0o600
        os.umask(0o022)
        fileio.atomic_write_text(tmp_path / "lab.json", "[]")
        assert stat.S_IMODE(os.stat(tmp_path / "lab.json").st_mode) == 0o644
        os.chmod(kept, 0o640)
        fileio.atomic_write_text(kept, "{}")
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640
    finally:
        os.umask(old)


def test_model_files_and_run_files_are_readable_by_the_group_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        cfg = ELMConfig(num_input=2, num_output=1, num_memory=2)
        save_model(tmp_path / "m.npz", cfg, ELM(cfg).state_dict())
        assert stat.S_IMODE(os.stat(tmp_path / "m.npz").st_mode) == 0o644
        result = invoke("data", "generate", "adding", "--n", "30", "--length", "5", "--out", tmp_path / "data")
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(os.stat(tmp_path / "data" / "adding.npz").st_mode) == 0o644
    finally:
        os.umask(old)


def test_an_output_that_is_an_input_is_refused(tmp_path):
    data = tmp_path / "model.npz"
    data.write_bytes(b"precious")
    alias = tmp_path / "alias.npz"
    alias.symlink_to(data)
    hard = tmp_path / "hard.npz"
    os.link(data, hard)
    for out in (data, alias, hard, tmp_path / "." / "model.npz"):
        with pytest.raises(ELMError, match="input"):
            fileio.atomic_write_bytes(out, b"x", inputs=[data])
    fileio.atomic_write_bytes(tmp_path / "other.npz", b"x", inputs=[data, None])
    assert data.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["under_a_file", "proc", "directory"])
def test_impossible_output_paths_are_one_error(tmp_path, where):
    (tmp_path / "file.npy").write_bytes(b"x")
    path = {"under_a_file": tmp_path / "file.npy" / "out.npy", "proc": "/proc/elmcore-test/out.npy",
            "directory": tmp_path}[where]
    with pytest.raises(ELMError, match="cannot write"):
        fileio.atomic_write_text(path, "x")
    assert leftovers(tmp_path) == [] and (tmp_path / "file.npy").read_bytes() == b"x"


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                         (errno.EDQUOT, "quota")])
def test_full_or_read_only_disks_are_one_error_and_leave_nothing(tmp_path, monkeypatch, code, words):
    target = tmp_path / "out.npz"
    target.write_bytes(b"old")

    def failing_save(f, **arrays):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(np, "savez", failing_save)
    cfg = ELMConfig(num_input=2, num_output=1, num_memory=2)
    with pytest.raises(ELMError, match=words):
        save_model(target, cfg, ELM(cfg).state_dict())
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_read_only_directory_is_one_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ELMError, match="read-only"):
        fileio.atomic_write_text(tmp_path / "x.json", "{}")


def test_stale_temporaries_are_found_by_name(tmp_path):
    for name in (".last.npz.abc123.tmp", ".last.npz.zz.tmp.npz", ".run.json.q.tmp", "last.npz", "notes.tmp"):
        (tmp_path / name).write_text("x")
    removed = fileio.remove_stale_temporaries(tmp_path, ["last.npz", "run.json"])
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path)) == ["last.npz", "notes.tmp"]


# ---- hostile .npy / .npz / JSON -----------------------------------------------------------

def _forged_npz(path, header_shape, payload=b"\0" * 16, dtype="<f8"):
    import zipfile
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    text = repr(header).encode("latin1")
    text += b" " * (64 - (10 + len(text) + 1) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("format.npy", member)


def test_forged_array_sizes_are_refused_before_allocation(tmp_path):
    _forged_npz(tmp_path / "bomb.npz", (2 ** 40,))
    with pytest.raises(ELMError, match="declares shape"):
        fileio.read_npz(tmp_path / "bomb.npz")
    _forged_npz(tmp_path / "obj.npz", (2,), dtype="|O")
    with pytest.raises(ELMError, match="Python objects"):
        fileio.read_npz(tmp_path / "obj.npz")
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ELMError, match="single .npy array"):
        fileio.read_npz(tmp_path / "x.npy")
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(ELMError, match="declares shape"):
        fileio.read_npy(tmp_path / "cut.npy")


def test_deeply_nested_json_is_one_error(tmp_path):
    with pytest.raises(ELMError, match="nested too deeply"):
        fileio.parse_json("[" * 200000 + "]" * 200000, "deep.json")


# ---- size guards ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("num_memory", 10 ** 9), ("mlp_num_layers", 10 ** 6),
                                          ("mlp_hidden_size", 10 ** 8)])
def test_models_too_large_for_the_machine_are_refused_with_their_size(field, value):
    with pytest.raises(ELMError, match=rf"{field}={value}.*would need at least [\d.e+]+ [GT]iB"):
        ELMConfig.from_dict({"num_input": 4, "num_output": 1, field: value})


@pytest.mark.parametrize("field, value", [("num_memory", 2000), ("mlp_num_layers", 10 ** 5),
                                          ("mlp_hidden_size", 10 ** 6)])
def test_networks_too_large_for_the_machine_are_refused_with_their_size(field, value, monkeypatch):
    # A 1 GiB machine: network sizes stop at 2**31 parameters, which a large machine could hold.
    monkeypatch.setattr(memory_module, "memory_limit_bytes", lambda: 2 ** 30)
    with pytest.raises(ELMError, match=r"a network of 1 x 8 neurons.*would need at least [\d.]+ [GT]iB"):
        ELMConfig.from_dict({"num_input": 4, "num_output": 1, "version": "elm_network", field: value})
    ELMConfig.from_dict({"num_input": 4, "num_output": 1, "version": "elm_network"})  # a small one fits


def test_check_memory_names_the_need_and_the_limit():
    with pytest.raises(ELMError, match=r"a thing would need at least 8 TiB of memory; this machine allows"):
        check_memory(8 * 2 ** 40, "a thing")
    check_memory(1024, "a small thing")


def test_the_memory_limit_follows_a_resource_limit_lowered_after_the_first_check():
    # The cgroup files are read once per process; a resource limit the process lowers later still counts.
    import subprocess
    import sys
    code = ("import resource; from elmcore.engine.memory import memory_limit_bytes; "
            "first = memory_limit_bytes(); limit = min(first, 2 ** 40) // 2; "
            "resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1])); "
            "print(memory_limit_bytes() == limit, first > limit)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_check_memory_on_a_gpu_checks_the_gpu_not_the_host(monkeypatch):
    import types
    monkeypatch.setattr(memory_module, "memory_limit_bytes", lambda: 2 ** 40)  # a roomy host
    monkeypatch.setattr(memory_module, "gpu_memory_bytes", lambda: (2 ** 30, 80 * 2 ** 30))
    gpu = types.SimpleNamespace(name="cuda", simulated=False)
    with pytest.raises(ELMError, match=r"a thing would need at least 2 GiB of GPU memory; this GPU has 1 GiB "
                                       r"free of 80 GiB"):
        check_memory(2 * 2 ** 30, "a thing", gpu)
    check_memory(2 ** 29, "a thing", gpu)
    # the simulator's arrays are NumPy arrays in host memory
    check_memory(2 * 2 ** 30, "a thing", types.SimpleNamespace(name="cuda", simulated=True))
    monkeypatch.setattr(memory_module, "memory_limit_bytes", lambda: 2 ** 20)
    with pytest.raises(ELMError, match="this machine allows 1 MiB"):
        check_memory(2 * 2 ** 20, "a thing", types.SimpleNamespace(name="cpu"))


@settings(max_examples=25, deadline=None)
@given(num_input=st.integers(1, 9), num_memory=st.integers(1, 9), layers=st.integers(0, 4),
       hidden=st.integers(1, 9), version=st.sampled_from(["elm_v1", "branch_elm_v2"]),
       routing=st.sampled_from([None, "random_routing"]), branches=st.integers(1, 4))
def test_parameter_count_in_closed_form_matches_the_shapes(num_input, num_memory, layers, hidden, version,
                                                           routing, branches):
    cfg = ELMConfig.from_dict(dict(num_input=num_input, num_output=2, num_memory=num_memory,
                                   mlp_num_layers=layers, mlp_hidden_size=hidden, version=version,
                                   input_to_synapse_routing=routing,
                                   num_branch=branches if routing else None,
                                   num_synapse_per_branch=2 if routing else 1))
    assert cfg.parameter_count() == sum(int(np.prod(s)) for s in expected_shapes(cfg).values())


@pytest.mark.parametrize("options, words", [
    ({"n": "abc"}, "n must be an integer"), ({"length": None}, "length may not be null"),
    ({"n": [1]}, "single value"), ({"n": 1e9}, "n must be an integer"),
    ({"valid_fraction": -1}, "valid_fraction must be in [0, 1)"), ({"n": 0}, "n must be >= 1"),
    ({"n": 10 ** 9}, "would need at least"), ({"length": 10 ** 12}, "would need at least"),
    ({"seed": -1}, "seed must be >= 0"), ({"num_tokens": True}, "must be an integer"),
])
def test_task_options_are_checked_for_type_and_range(options, words):
    name = "delayed-recall" if "num_tokens" in options else "adding"
    with pytest.raises(ELMError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        get_task(name, **options)


# ---- run settings -------------------------------------------------------------------------

BAD_SETTINGS = [({"epochs": "ten"}, "epochs"), ({"lr": "fast"}, "lr"), ({"lr": None}, "lr"),
                ({"batch_size": 1.5}, "batch_size"), ({"model": [1, 2]}, "model"),
                ({"task_options": "x"}, "task_options"), ({"seed": -1}, "seed"), ({"epochs": True}, "epochs"),
                ({"weight_decay": float("nan")}, "weight_decay"), ({"clip_norm": 0}, "clip_norm"),
                ({"optimizer": "sgd"}, "optimizer"), ({"task_options": {"seed": 3}}, "seed"),
                ({"lr": float("inf")}, "lr"), ({"epochs": 10.0}, "epochs"), ({"dtype": "float16"}, "dtype")]


@pytest.mark.parametrize("bad, field", BAD_SETTINGS)
def test_run_settings_of_the_wrong_type_or_range_name_the_setting(bad, field):
    with pytest.raises(ELMError, match=f"'{field}'|{field}"):
        TrainSettings.from_dict({"task": "adding", **bad})


def test_a_run_config_must_be_a_table():
    for value in ([1, 2], "adding", 3, None):
        with pytest.raises(ELMError, match="must be a JSON object"):
            TrainSettings.from_dict(value)


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats() |
                            st.text(max_size=5), lambda inner: st.lists(inner, max_size=3) |
                            st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_FIELDS = ["epochs", "batch_size", "lr", "min_lr", "seed", "clip_norm", "weight_decay", "input_dropout",
           "warmup_steps", "model", "task_options", "optimizer", "dtype", "batches_per_epoch", "task"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=4))
def test_any_json_run_config_is_accepted_or_refused_with_an_elm_error(config):
    try:
        settings_ = TrainSettings.from_dict({"task": "adding", **config} if "task" not in config else config)
    except ELMError:
        return
    # Accepted settings are what the loop can use as they are.
    assert isinstance(settings_.epochs, int) and not isinstance(settings_.epochs, bool) and settings_.epochs >= 1
    assert isinstance(settings_.lr, (int, float)) and np.isfinite(settings_.lr) and settings_.lr > 0
    assert isinstance(settings_.model, dict) and isinstance(settings_.task_options, dict)
    assert settings_.seed >= 0 and settings_.optimizer in ("adam", "adamw", "adamax")


# ---- the command line: every command, hostile input ------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    np.save(d / "X.npy", np.zeros((2, 5, 2), np.float32))
    cfg = ELMConfig(num_input=2, num_output=1, num_memory=3)
    save_model(d / "model.npz", cfg, ELM(cfg).state_dict())
    (d / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (d / "list.json").write_text("[1, 2]")
    (d / "latin1.json").write_bytes(b'{"task": "caf\xe9"}')
    (d / "plain.txt").write_text("not a model")
    (d / "data").mkdir()
    (d / "data" / "adding.npz").write_bytes(b"")
    return d


def _run_config(files, name, content):
    path = files / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


CLI_CASES = {
    "info .npy": (lambda f: ["info", f / "X.npy"], ["single .npy array"]),
    "verify .npy": (lambda f: ["verify", f / "X.npy"], ["single .npy array"]),
    "verify a model": (lambda f: ["verify", f / "model.npz"], ["is a model file, not an oracle file"]),
    "predict .npy model": (lambda f: ["predict", f / "X.npy", "--input", f / "X.npy", "--output", f / "o.npy"],
                           ["single .npy array"]),
    "info text": (lambda f: ["info", f / "plain.txt"], ["not a zip archive"]),
    "info deep json": (lambda f: ["info", f / "deep.json"], ["nested too deeply"]),
    "train deep model config": (lambda f: ["train", "--model-config", f / "deep.json", "--run-dir", f / "r"],
                                ["nested too deeply"]),
    "train deep run config": (lambda f: ["train", "--config", f / "deep.json"], ["nested too deeply"]),
    "train list run config": (lambda f: ["train", "--config", f / "list.json"], ["must be a JSON object"]),
    "train latin-1 run config": (lambda f: ["train", "--config", f / "latin1.json"], ["UTF-8"]),
    "train bad toml": (lambda f: ["train", "--config", _run_config(f, "bad.toml", "epochs = [")], ["bad.toml"]),
    "train toml string epochs": (lambda f: ["train", "--config", _run_config(f, "s.toml", 'epochs = "ten"\n')],
                                 ["'epochs'"]),
    "train toml model array": (lambda f: ["train", "--config", _run_config(f, "m.toml", 'model = [1, 2]\n'),
                                          "--set", "num_memory=2"], ["'model'"]),
    "train json lr null": (lambda f: ["train", "--config", _run_config(f, "n.json", {"lr": None})], ["'lr'"]),
    "train json epochs true": (lambda f: ["train", "--config", _run_config(f, "t.json", {"epochs": True})],
                               ["'epochs'"]),
    "train seed -1": (lambda f: ["train", "--seed", "-1"], ["--seed"]),
    "train lr nan": (lambda f: ["train", "--lr", "nan"], ["--lr"]),
    "train weight decay nan": (lambda f: ["train", "--weight-decay", "nan"], ["--weight-decay"]),
    "train clip inf": (lambda f: ["train", "--clip-norm", "inf"], ["--clip-norm"]),
    "gradcheck tolerance nan": (lambda f: ["gradcheck", "--tolerance", "nan"], ["--tolerance"]),
    "gradcheck eps nan": (lambda f: ["gradcheck", "--eps", "nan"], ["--eps"]),
    "train task option abc": (lambda f: ["train", "--task", "adding", "--task-option", "n=abc"], ["n must be"]),
    "train task option seed": (lambda f: ["train", "--task", "adding", "--task-option", "seed=3"], ["--seed"]),
    "train task option bomb": (lambda f: ["train", "--task", "adding", "--task-option", "n=1000000000"],
                               ["would need at least"]),
    "train model bomb": (lambda f: ["train", *TINY_ADDING, "--set", "num_memory=1000000000", "--run-dir", f / "rb"],
                         ["num_memory=1000000000", "would need at least"]),
    "train activations bomb": (lambda f: ["train", "--task", "adding", "--task-option", "n=3", "--task-option",
                                          "length=20000000", "--run-dir", f / "ra"],
                               ["sequences of 20000000 steps", "would need at least"]),
    "train config /dev/zero": (lambda f: ["train", "--config", "/dev/zero"], ["larger than"]),
    "train run dir with NUL": (lambda f: ["train", "--config", _run_config(f, "nul.json", {"run_dir": "a\0b"})],
                               ["'run_dir'", "NUL"]),
    "predict output empty": (lambda f: ["predict", f / "model.npz", "--input", f / "X.npy", "--output", ""],
                             ["not a file name"]),
    "predict output a directory": (lambda f: ["predict", f / "model.npz", "--input", f / "X.npy", "--output",
                                              f / "data"], ["directory"]),
    "train layers bomb": (lambda f: ["train", "--task", "adding", "--set", "mlp_num_layers=1000000",
                                     "--run-dir", f / "rl"], ["mlp_num_layers=1000000", "would need at least"]),
    "train run dir in /proc": (lambda f: ["train", *TINY_ADDING, "--run-dir", "/proc/elmcore-test/run"],
                               ["/proc/elmcore-test/run"]),
    "train run dir under a file": (lambda f: ["train", *TINY_ADDING, "--run-dir", f / "plain.txt" / "run"],
                                   ["plain.txt"]),
    "predict over the model": (lambda f: ["predict", f / "model.npz", "--input", f / "X.npy", "--output",
                                          f / "model.npz"], ["input"]),
    "predict over the input": (lambda f: ["predict", f / "model.npz", "--input", f / "X.npy", "--output",
                                          f / "X.npy"], ["input"]),
    "predict under a file": (lambda f: ["predict", f / "model.npz", "--input", f / "X.npy", "--output",
                                        f / "plain.txt" / "out.npy"], ["cannot write"]),
    "eval json over the model": (lambda f: ["eval", f / "model.npz", "--task", "adding", "--task-option", "n=20",
                                            "--task-option", "length=4", "--json", f / "model.npz"], ["input"]),
    "eval json in /proc": (lambda f: ["eval", f / "model.npz", "--task", "adding", "--task-option", "n=20",
                                      "--task-option", "length=4", "--json", "/proc/elmcore-test/m.json"],
                           ["cannot write"]),
    "eval task option name": (lambda f: ["eval", f / "model.npz", "--task", "adding", "--task-option", "name=x"],
                              ["name"]),
    "data info bad option": (lambda f: ["data", "info", f / "data", "--task", "adding", "-O", "n=[1]"],
                             ["only when generating"]),
    "data generate bad option": (lambda f: ["data", "generate", "adding", "--out", f / "gen", "-O", "length=null"],
                                 ["length may not be null"]),
    "data generate bomb": (lambda f: ["data", "generate", "adding", "--out", f / "gen", "--n", "1000000000"],
                           ["would need at least"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_hostile_input_with_one_error_line(files, case):
    build, needles = CLI_CASES[case]
    before = (files / "model.npz").read_bytes(), (files / "X.npy").read_bytes()
    assert_refused(invoke(*build(files)), *needles)
    assert ((files / "model.npz").read_bytes(), (files / "X.npy").read_bytes()) == before
    assert leftovers(files) == []


def test_convert_onto_its_own_checkpoint_is_refused(tmp_path):
    src = os.path.join(REFERENCE_DIR, "num_memory_1")
    for name in ("neuronio_best_model_state.pt", "model_config.json"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    pt = tmp_path / "neuronio_best_model_state.pt"
    before = pt.read_bytes()
    assert_refused(invoke("convert", pt, "-o", pt), "input")
    assert_refused(invoke("convert", pt, "-o", tmp_path / "model_config.json"), "input")
    assert_refused(invoke("convert", pt, "--config", tmp_path / "deep.json", "-o", tmp_path / "m.npz"), "not found")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    assert_refused(invoke("convert", pt, "--config", tmp_path / "deep.json", "-o", tmp_path / "m.npz"),
                   "nested too deeply")
    assert pt.read_bytes() == before and not (tmp_path / "m.npz").exists()


# ---- training faults ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("runs") / "done"
    result = invoke("train", *TINY_ADDING, "--epochs", "2", "--checkpoint-every", "2", "--run-dir", rd)
    assert result.exit_code == 0, result.output
    return rd


def _copy_run(finished_run, tmp_path):
    rd = tmp_path / "copy"
    shutil.copytree(finished_run, rd)
    return rd


def _rewrite_checkpoint(path, change):
    data = fileio.read_npz(path)
    change(data)
    with open(path, "wb") as f:
        np.savez(f, **data)


def _set_position(**entries):
    def change(data):
        meta = json.loads(str(data["meta"]))
        meta["position"].update(entries)
        data["meta"] = np.array(json.dumps(meta))
    return change


RESUME_DAMAGE = {
    "run.json a list": (lambda rd: (rd / "run.json").write_text("[1]"), "must be a JSON object"),
    "run.json epochs text": (lambda rd: (rd / "run.json").write_text(json.dumps(
        {**json.loads((rd / "run.json").read_text()), "epochs": "ten"})), "'epochs'"),
    "run.json not UTF-8": (lambda rd: (rd / "run.json").write_bytes(b"\xff\xfe{"), "UTF-8"),
    "run.json deep": (lambda rd: (rd / "run.json").write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    "meta without position": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(
        meta=np.array("{}"))), "position"),
    "meta a list": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(meta=np.array("[]"))),
                    "JSON object"),
    "position step text": (lambda rd: _rewrite_checkpoint(rd / "last.npz", _set_position(step="3")), "'step'"),
    "position epoch negative": (lambda rd: _rewrite_checkpoint(rd / "last.npz", _set_position(epoch=-1)),
                                "'epoch'"),
    "position rng garbage": (lambda rd: _rewrite_checkpoint(rd / "last.npz", _set_position(
        dropout_rng={"bit_generator": "PCG64", "state": "x"})), "dropout_rng"),
    "optimizer entry missing": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.pop(
        "optim/exp_avg/w_y.weight")), "optimizer state"),
    "optimizer step text": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(
        {"optim/t": np.array("many")})), "'t'"),
    "optimizer state nan": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(
        {"optim/exp_avg/w_y.bias": np.full_like(d["optim/exp_avg/w_y.bias"], np.nan)})), "NaN"),
    "parameter missing": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.pop("param/w_y.bias")),
                          "w_y.bias"),
    "dtype entry a number": (lambda rd: _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(
        dtype=np.array(3.0))), "dtype"),
    "checkpoint a .npy": (lambda rd: np.save(open(rd / "last.npz", "wb"), np.zeros(3)), "single .npy array"),
}


@pytest.mark.parametrize("damage", sorted(RESUME_DAMAGE))
def test_resume_from_a_damaged_run_directory_is_one_error(finished_run, tmp_path, damage):
    rd = _copy_run(finished_run, tmp_path)
    spoil, words = RESUME_DAMAGE[damage]
    spoil(rd)
    assert_refused(invoke("train", "--resume", rd, "--extend", "--epochs", "3", "--quiet"), words)


def test_resume_skips_damaged_metrics_lines_that_plot_names(finished_run, tmp_path):
    rd = _copy_run(finished_run, tmp_path)
    with open(rd / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n\xff\xfe not utf-8\n{"type": "step", "step": "x"}\n{"type": "epoch"}\n')
    pytest.importorskip("matplotlib")
    # elm plot names the damage (a figure silently missing records would mislead); resume drops it.
    assert_refused(invoke("plot", rd), "metrics.jsonl line")
    result = invoke("train", "--resume", rd, "--extend", "--epochs", "3", "--quiet")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]  # counted from 1, as on the console
    result = invoke("plot", rd)
    assert result.exit_code == 0, result.output


def test_plot_refuses_unwritable_outputs_and_run_files(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    rd = _copy_run(finished_run, tmp_path)
    assert_refused(invoke("plot", rd, "-o", "/proc/elmcore-test/curves.png"), "cannot write")
    assert_refused(invoke("plot", rd, "-o", rd / "last.npz"), "input")
    (rd / "metrics.jsonl").write_bytes(b"\n")
    assert_refused(invoke("plot", rd), "no training steps")


def test_data_info_preview_to_an_impossible_path_is_one_error(tmp_path):
    pytest.importorskip("matplotlib")
    from elmcore.data.synthetic import make_synthetic
    make_synthetic("adding", n=20, length=5).save(tmp_path / "adding.npz")
    assert_refused(invoke("data", "info", tmp_path, "--preview", tmp_path / "adding.npz" / "p.png"),
                   "cannot write")
    assert_refused(invoke("data", "info", tmp_path, "--preview", tmp_path / "adding.npz"), "input")


@pytest.mark.parametrize("lr, dtype, words", [
    ("1e6", "float32", "exceeds 1000 times the loss of the first step"),
    ("1e25", "float64", "exceeds 1000 times the loss of the first step"),
    ("1e30", "float32", "step"),
])
def test_divergence_stops_with_the_step_and_is_recorded(tmp_path, lr, dtype, words):
    rd = tmp_path / "run"
    result = invoke("train", *TINY_ADDING, "--epochs", "3", "--lr", lr, "--dtype", dtype, "--checkpoint-every",
                    "1", "--run-dir", rd)
    assert_refused(result, "training stopped", words, "last good checkpoint", "last.npz (step 1)")
    assert "non-finite outputs" not in result.output
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "diverged" and records[-1]["step"] == 2
    assert load_file(rd / "last.npz").meta["step"] == 1


def test_a_diverging_network_stops_with_the_step_too(tmp_path):
    rd = tmp_path / "run"
    result = invoke("train", *TINY_ADDING, "--epochs", "3", "--lr", "1e30", "--set", "version=elm_network",
                    "--set", "num_neurons=4", "--checkpoint-every", "1", "--run-dir", rd)
    assert_refused(result, "training stopped", "step", "last good checkpoint")
    assert "non-finite outputs" not in result.output
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "diverged"


def test_a_second_trainer_on_a_locked_run_directory_is_refused(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    holder = _lock_run_dir(str(rd))  # the first trainer, as far as the lock can tell
    try:
        assert_refused(invoke("train", *TINY_ADDING, "--epochs", "1", "--run-dir", rd),
                       "in use by another trainer", f"process {os.getpid()}")
        assert not (rd / "run.json").exists()
    finally:
        holder.close()
    result = invoke("train", *TINY_ADDING, "--epochs", "1", "--run-dir", rd)
    assert result.exit_code == 0, result.output


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    outputs = [invoke("train", *TINY_ADDING, "--epochs", "1").output for _ in range(2)]
    assert sorted(os.listdir(tmp_path / "runs")) == ["adding-20260101-000000", "adding-20260101-000000-2"]
    for name, output in zip(sorted(os.listdir(tmp_path / "runs")), outputs):
        assert os.path.join("runs", name, "best.npz") in output
        assert len((tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()) == 4 + 1


def test_stale_temporaries_of_a_killed_run_are_removed_on_resume(finished_run, tmp_path):
    rd = _copy_run(finished_run, tmp_path)
    (rd / ".last.npz.k1ll3d.tmp").write_bytes(b"torn")
    (rd / ".metrics.jsonl.x.tmp").write_bytes(b"torn")
    result = invoke("train", "--resume", rd, "--extend", "--epochs", "3", "--quiet")
    assert result.exit_code == 0, result.output
    assert leftovers(rd) == []


def test_a_failed_train_leaves_no_empty_run_directory(tmp_path):
    rd = tmp_path / "run"
    from elmcore.data.synthetic import make_synthetic
    task = make_synthetic("adding", n=40, length=6)
    task.splits["train"][0][1, 2, 0] = np.nan
    task.save(tmp_path / "adding.npz")
    assert_refused(invoke("train", "--task", "adding", "--data-dir", tmp_path, "--run-dir", rd, "--quiet"), "NaN")
    assert not rd.exists()
    assert_refused(invoke("train", *TINY_ADDING, "--set", "num_memory=0", "--run-dir", rd), "num_memory")
    assert not rd.exists()


def test_a_failed_train_in_a_default_directory_leaves_nothing(tmp_path, monkeypatch):
    from elmcore.data.synthetic import make_synthetic
    task = make_synthetic("adding", n=40, length=6)
    task.splits["train"][0][0, 0, 0] = np.inf
    task.save(tmp_path / "adding.npz")
    monkeypatch.chdir(tmp_path)
    assert_refused(invoke("train", "--task", "adding", "--data-dir", tmp_path, "--quiet"), "infinite")
    assert not (tmp_path / "runs").exists()


def test_info_on_a_checkpoint_with_odd_metadata_still_describes_it(finished_run, tmp_path):
    rd = _copy_run(finished_run, tmp_path)
    _rewrite_checkpoint(rd / "last.npz", lambda d: d.update(meta=np.array(json.dumps(
        {"step": "x", "best_metric": "best", "position": {}}))))
    result = invoke("info", rd / "last.npz")
    assert result.exit_code == 0, result.output
    assert "elmcore-checkpoint" in result.output


def test_done_line_names_no_best_model_when_none_was_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_is_better", lambda self, value: False)
    rd = tmp_path / "run"
    result = invoke("train", *TINY_ADDING, "--epochs", "1", "--run-dir", rd)
    assert result.exit_code == 0, result.output
    assert not (rd / "best.npz").exists()
    assert "best.npz" not in result.output.replace("no best.npz", "")
    assert str(rd / "last.npz") in result.output


def test_resumed_epoch_averages_the_whole_epoch(tmp_path):
    from elmcore.data.synthetic import make_synthetic

    def trainer(name):
        s = TrainSettings(task="adding", epochs=1, batch_size=8, lr=3e-3, checkpoint_every=2,
                          model={"num_memory": 3}, run_dir=str(tmp_path / name))
        return Trainer(s, task=make_synthetic("adding", n=50, length=6), progress=False, log=lambda m: None)

    trainer("full").run()
    run_killed_after(trainer("killed"), 3)
    Trainer.resume(str(tmp_path / "killed"), task=make_synthetic("adding", n=50, length=6), progress=False,
                   log=lambda m: None).run()

    def epoch_loss(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["train_loss"] for line in lines if '"epoch"' in line and '"train_loss"' in line]

    assert epoch_loss("killed") == epoch_loss("full") and len(epoch_loss("full")) == 1


def test_run_files_are_never_written_over_the_run_config(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    config = rd / "run.json"
    config.write_text(json.dumps({"task": "adding", "epochs": 1, "task_options": {"n": 40, "length": 6}}))
    before = config.read_text()
    assert_refused(invoke("train", "--config", config, "--run-dir", rd, "--quiet"), "input")
    assert config.read_text() == before
    assert set(RUN_FILES) & set(os.listdir(rd)) == {"run.json"}


def test_divergence_after_a_bad_update_keeps_the_last_good_checkpoint(tmp_path):
    from elmcore.data.synthetic import make_synthetic
    s = TrainSettings(task="adding", epochs=2, batch_size=8, lr=1e6, checkpoint_every=1,
                      model={"num_memory": 3}, run_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingDiverged, match=r"step 2 .*last good checkpoint .*last.npz \(step 1\)"):
        Trainer(s, task=make_synthetic("adding", n=50, length=6), progress=False, log=lambda m: None).run()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_a_full_or_read_only_disk_during_training_is_one_error(tmp_path, monkeypatch, code, words):
    def failing_save(f, **arrays):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(np, "savez", failing_save)
    rd = tmp_path / "run"
    assert_refused(invoke("train", *TINY_ADDING, "--epochs", "1", "--checkpoint-every", "1", "--run-dir", rd),
                   "cannot write", "last.npz", words)
    assert leftovers(rd) == []


_option_values = st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | \
    st.text(max_size=4) | st.lists(st.integers(0, 3), max_size=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["adding", "delayed-recall"]),
       options=st.dictionaries(st.sampled_from(["n", "length", "num_tokens", "valid_fraction", "test_fraction",
                                                "seed", "junk"]), _option_values, max_size=3))
def test_any_task_options_give_a_task_or_an_elm_error(name, options):
    try:
        task = get_task(name, **options)
    except ELMError:
        return
    assert task.num_examples("train") >= 1 and task.num_input >= 2


@pytest.mark.slow
def test_two_trainer_processes_on_one_run_directory(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    rd = tmp_path / "run"
    cmd = [sys.executable, "-m", "elm_cli.main", "train", "--task", "adding", "--task-option", "n=4000",
           "--task-option", "length=30", "--epochs", "50", "--quiet", "--run-dir", str(rd)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((rd / "metrics.jsonl").exists() and
                                              (rd / "metrics.jsonl").stat().st_size):
            time.sleep(0.05)
        assert first.poll() is None, "the first trainer must still be running for this test to mean anything"
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "in use by another trainer" in second.stderr and f"process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_forward_pass_that_cannot_fit_is_refused_before_allocating(files, tmp_path, monkeypatch):
    # A machine with 64 KiB: not even one time block's cache (1024 steps, 112 KiB for this model) fits.
    monkeypatch.setattr("elmcore.engine.memory.memory_limit_bytes", lambda: 2 ** 16)
    np.save(tmp_path / "long.npy", np.zeros((1, 2 ** 20, 2), np.float32))
    assert_refused(invoke("predict", files / "model.npz", "--input", tmp_path / "long.npy", "--output",
                          tmp_path / "out.npy"), "forward pass over 1 sequences of 1048576 steps in segments of 1024",
                   "would need at least", "allows 64 KiB")
    assert not (tmp_path / "out.npy").exists()


def test_a_forward_pass_longer_than_memory_runs_in_segments(files, tmp_path, monkeypatch):
    # A machine with 64 MiB, where the whole cache of 2^20 steps (224 MiB) does not fit: the pass keeps
    # the state every few blocks instead (engine/segments.py) and gives the whole sequence's outputs.
    monkeypatch.setattr("elmcore.engine.memory.memory_limit_bytes", lambda: 2 ** 26)
    X = np.random.default_rng(0).random((1, 2 ** 20, 2)).astype(np.float32)
    np.save(tmp_path / "long.npy", X)
    result = invoke("predict", files / "model.npz", "--input", tmp_path / "long.npy", "--output", tmp_path / "out.npy")
    assert result.exit_code == 0, result.output
    model = load_model(files / "model.npz")
    expected = model.forward(X[:, :2048])  # the first two time blocks, without segments
    assert np.array_equal(np.load(tmp_path / "out.npy")[:, :2048], expected)
