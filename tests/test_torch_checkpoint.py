"""Reading PyTorch checkpoints without PyTorch: the release's files, hand-built layouts, hostile pickles."""

import builtins
import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from elmcore import ELM, ELMError
from elmcore.errors import CheckpointError
from elmcore.neuron.params import neuronio_routing
from elmcore.verification.torch_checkpoint import load_release_model, load_torch_state_dict

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference_models"
GOLDEN_BEST = DATA / "golden" / "official_best_elm_neuron.npz"
RELEASE_DIRS = sorted(p.parent for p in REFERENCE.glob("*/neuronio_best_model_state.pt"))
BEST_PT = REFERENCE / "best_elm_neuron" / "neuronio_best_model_state.pt"
SMALL_PT = REFERENCE / "num_memory_1" / "neuronio_best_model_state.pt"

# docs/spec.md §2: parameter counts of the official NeuronIO checkpoints by num_memory.
SPEC_PARAM_COUNTS = {1: 4601, 2: 4708, 3: 4823, 5: 5077, 7: 5363, 10: 5852, 15: 6827, 20: 8002,
                     25: 9377, 30: 10952, 40: 14702, 50: 19252, 75: 34127, 100: 54002}
# The order in which the release's data.pkl lists its tensors (seen with pickletools.dis).
RELEASE_FILE_ORDER = ["_proto_w_s", "tau_s", "_proto_tau_m", "input_to_synapse_indices",
                      "valid_indices_mask", "mlp.network.0.weight", "mlp.network.0.bias",
                      "mlp.network.2.weight", "mlp.network.2.bias", "w_y.weight", "w_y.bias"]


# ---- writing torch-format checkpoints without torch ---------------------------------

class TorchGlobal:
    """A torch global (``torch.FloatStorage``, ``torch._utils._rebuild_tensor_v2``, ...) by name."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __reduce__(self):
        return self.name  # a str sends the pickler to save_global, overridden below

    def __call__(self, *args):
        raise AssertionError("stand-in for a torch callable; the pickler only needs it callable")


class Storage:
    def __init__(self, key, storage_type, numel, location="cpu"):
        self.key, self.numel, self.location = key, numel, location
        self.type_global = storage_type if isinstance(storage_type, TorchGlobal) else \
            TorchGlobal("torch", storage_type)


class Tensor:
    """Pickles like a torch tensor: ``_rebuild_tensor_v2`` (or ``v3`` given a dtype) of a storage."""

    def __init__(self, storage, offset, size, stride, dtype=None, build_state=None):
        self.args = (storage, offset, tuple(size), tuple(stride))
        self.dtype, self.build_state = dtype, build_state

    def __reduce__(self):
        if self.dtype is None:
            func = TorchGlobal("torch._utils", "_rebuild_tensor_v2")
            args = self.args + (False, collections.OrderedDict())
        else:
            func = TorchGlobal("torch._utils", "_rebuild_tensor_v3")
            args = self.args + (False, collections.OrderedDict(), TorchGlobal("torch", self.dtype))
        return (func, args) if self.build_state is None else (func, args, self.build_state)


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return TorchGlobal("torch._utils", "_rebuild_parameter"), (self.tensor, True, collections.OrderedDict())


class TorchLikePickler(pickle._Pickler):
    """Writes :class:`TorchGlobal` as a plain GLOBAL opcode and storages as persistent ids.

    The pure-Python pickler is used because it lets ``save_global`` be replaced:
    both picklers otherwise import the module to check the name, and torch is
    not installed.
    """

    def save_global(self, obj, name=None):
        if isinstance(obj, TorchGlobal):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.type_global, obj.key, obj.location, obj.numel)
        return None


def torch_pickle(obj):
    buf = io.BytesIO()
    # fix_imports=False keeps Python 3 module names (builtins, not __builtin__) in the file.
    TorchLikePickler(buf, protocol=2, fix_imports=False).dump(obj)
    return buf.getvalue()


def write_checkpoint(path, state, storages=(), prefix="archive", byteorder=None, extra=()):
    """A torch.save-style zip: ``state`` (object or pickle bytes), raw storages by key, extra records."""
    data = state if isinstance(state, bytes) else torch_pickle(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in dict(storages).items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        for name, raw in dict(extra).items():
            zf.writestr(f"{prefix}/{name}", raw)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def small_valid_state():
    values = np.arange(4, dtype="<f4")
    return collections.OrderedDict(w=Tensor(Storage("0", "FloatStorage", 4), 0, (4,), (1,))), \
        {"0": values.tobytes()}


# ---- the release's checkpoints ------------------------------------------------------

def test_all_fifteen_release_checkpoints_are_present():
    assert len(RELEASE_DIRS) == 15


@pytest.mark.parametrize("model_dir", RELEASE_DIRS, ids=lambda p: p.name)
def test_release_checkpoint_loads_and_counts_parameters(model_dir):
    pt = model_dir / "neuronio_best_model_state.pt"
    raw = load_torch_state_dict(pt)
    assert list(raw) == RELEASE_FILE_ORDER
    assert raw["input_to_synapse_indices"].dtype == np.int64
    assert raw["valid_indices_mask"].dtype == np.bool_
    assert all(raw[k].dtype == np.float32 for k in RELEASE_FILE_ORDER[:3] + RELEASE_FILE_ORDER[5:])

    cfg, params = load_release_model(pt)
    stats = json.loads((model_dir / "model_stats.json").read_text())
    model = ELM(cfg, params=params, dtype="float64")
    assert model.num_parameters == stats["model_param_count"] == SPEC_PARAM_COUNTS[cfg.num_memory]

    for key, value in params.items():
        if key in ("input_to_synapse_indices", "valid_indices_mask"):
            assert value.dtype == raw[key].dtype
        else:
            assert value.dtype == np.float64
        np.testing.assert_array_equal(value, raw[key].astype(value.dtype))
    # The integer storages decode to exactly the routing the config implies.
    idx, mask = neuronio_routing(cfg.num_input, cfg.branches, cfg.num_synapse_per_branch)
    np.testing.assert_array_equal(params["input_to_synapse_indices"], idx)
    np.testing.assert_array_equal(params["valid_indices_mask"], mask)


def test_best_checkpoint_equals_oracle_parameters_and_reproduces_its_outputs():
    golden = np.load(GOLDEN_BEST)
    cfg, params = load_release_model(BEST_PT)
    assert set(params) == {k[len("param/"):] for k in golden.files if k.startswith("param/")}
    for key, value in params.items():
        expected = golden[f"param/{key}"]
        assert value.dtype == expected.dtype, key
        np.testing.assert_array_equal(value, expected, err_msg=key)

    X, Y_ref = golden["X"], golden["Y"]
    Y32 = ELM(cfg, params=params, dtype="float32").forward(X)
    # Per output channel, relative to its scale: the spike logit passes through zero.
    err32 = np.abs(Y32 - Y_ref).max(axis=(0, 1))
    scale = np.abs(Y_ref).max(axis=(0, 1))
    assert np.all(err32 <= 1e-4 * scale), (err32, scale)
    Y64 = ELM(cfg, params=params, dtype="float64").forward(X)
    np.testing.assert_allclose(Y64, Y_ref, rtol=1e-10, atol=0)


def test_release_model_with_explicit_config_path_and_version(tmp_path):
    shutil.copy(SMALL_PT, tmp_path / "weights.pt")
    cfg, params = load_release_model(tmp_path / "weights.pt",
                                     config_path=SMALL_PT.parent / "model_config.json", version="elm_v1")
    assert cfg.num_memory == 1 and cfg.version == "elm_v1"
    assert params["w_y.weight"].shape == (2, 1)


def test_release_model_without_config_is_refused(tmp_path):
    shutil.copy(SMALL_PT, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="model_config.json"):
        load_release_model(tmp_path / "weights.pt")


def test_release_model_with_mismatched_config_names_file_and_key(tmp_path):
    shutil.copy(SMALL_PT, tmp_path / "weights.pt")
    with pytest.raises(ELMError, match=r"weights\.pt.*mlp\.network\.0\.weight"):
        load_release_model(tmp_path / "weights.pt", config_path=BEST_PT.parent / "model_config.json")


def test_release_model_with_invalid_config_json(tmp_path):
    shutil.copy(SMALL_PT, tmp_path / "weights.pt")
    (tmp_path / "model_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_release_model(tmp_path / "weights.pt")


# ---- hand-built layouts --------------------------------------------------------------

def element(storage, offset, stride, index):
    return storage[offset + sum(i * s for i, s in zip(index, stride))]


def test_strided_views_offsets_and_shared_storage_read_back(tmp_path):
    storage = np.arange(40, dtype="<f4") * 1.5 - 7.0
    st = Storage("7", "FloatStorage", 40)
    layouts = {  # name: (offset, size, stride)
        "transposed": (3, (3, 4), (1, 5)),
        "every_other": (1, (2, 3), (12, 2)),
        "broadcast": (10, (3, 2), (0, 1)),
        "scalar": (39, (), ()),
        "empty": (0, (0, 3), (3, 1)),
        "contiguous": (20, (2, 2, 5), (10, 5, 1)),
    }
    state = collections.OrderedDict(
        (name, Tensor(st, off, size, stride)) for name, (off, size, stride) in layouts.items())
    state["as_parameter"] = Parameter(Tensor(st, 5, (4,), (3,)))
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # what module.state_dict() carries
    path = write_checkpoint(tmp_path / "strided.pt", state, {"7": storage.tobytes()})

    out = load_torch_state_dict(path)
    assert list(out) == list(layouts) + ["as_parameter"]
    for name, (off, size, stride) in list(layouts.items()) + [("as_parameter", (5, (4,), (3,)))]:
        arr = out[name]
        assert arr.shape == size and arr.dtype == np.float32
        assert arr.flags.c_contiguous and arr.flags.writeable and arr.flags.owndata
        for index in np.ndindex(*size):
            assert arr[index] == element(storage, off, stride, index), (name, index)


STORAGE_CASES = {  # storage type: (values, dtype on disk, dtype read back)
    "FloatStorage": ([1.5, -2.25, 3e38], "<f4", np.float32),
    "DoubleStorage": ([np.pi, -1e-300, 2.0], "<f8", np.float64),
    "HalfStorage": ([0.5, -65504.0, 1.0 / 1024], "<f2", np.float16),
    "LongStorage": ([-(2 ** 62), 0, 2 ** 40 + 3], "<i8", np.int64),
    "IntStorage": ([-(2 ** 31), 7, 2 ** 31 - 1], "<i4", np.int32),
    "ShortStorage": ([-32768, 1, 32767], "<i2", np.int16),
    "CharStorage": ([-128, 0, 127], "i1", np.int8),
    "ByteStorage": ([0, 128, 255], "u1", np.uint8),
    "BoolStorage": ([True, False, True], "u1", np.bool_),
}


@pytest.mark.parametrize("storage_type", sorted(STORAGE_CASES))
def test_each_storage_type_reads_back(tmp_path, storage_type):
    values, disk, expected_dtype = STORAGE_CASES[storage_type]
    raw = np.array(values, dtype=disk).tobytes()
    state = {"x": Tensor(Storage("0", storage_type, 3), 0, (3,), (1,))}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "t.pt", state, {"0": raw}))
    assert out["x"].dtype == expected_dtype
    np.testing.assert_array_equal(out["x"], np.array(values, dtype=expected_dtype))


def test_bfloat16_storage_widens_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 0.15625, 3.0e38, -1.0e-30], dtype=np.float32)
    values = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bf16
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    state = {"x": Tensor(Storage("0", "BFloat16Storage", 5), 0, (5,), (1,))}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "t.pt", state, {"0": raw}))
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], values)


def test_big_endian_byteorder_record(tmp_path):
    doubles = np.array([[1.0, -2.0], [np.e, 1e-12]])
    ints = np.array([1, -70000, 2 ** 30], dtype=np.int32)
    state = {"d": Tensor(Storage("0", "DoubleStorage", 4), 0, (2, 2), (1, 2)),
             "i": Tensor(Storage("1", "IntStorage", 3), 1, (2,), (1,))}
    storages = {"0": doubles.astype(">f8").tobytes(), "1": ints.astype(">i4").tobytes()}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "be.pt", state, storages, byteorder="big"))
    np.testing.assert_array_equal(out["d"], doubles.T)
    np.testing.assert_array_equal(out["i"], ints[1:])
    assert out["d"].dtype.isnative and out["i"].dtype.isnative


def test_explicit_little_byteorder_and_other_prefix(tmp_path):
    state, storages = small_valid_state()
    out = load_torch_state_dict(write_checkpoint(tmp_path / "x.pt", state, storages,
                                                 prefix="my_model", byteorder="little"))
    np.testing.assert_array_equal(out["w"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("module", ["torch", "torch.storage"])
def test_untyped_storage_with_v3_dtype(tmp_path, module):
    doubles = np.array([0.5, -1.25, 2.0, 8.0, -3.0])
    halfwords = np.array([1, 65535, 40000], dtype="<u2")
    untyped = TorchGlobal(module, "UntypedStorage")
    state = collections.OrderedDict(
        d=Tensor(Storage("a", untyped, doubles.nbytes), 1, (2,), (2,), dtype="float64"),
        u=Tensor(Storage("b", untyped, halfwords.nbytes), 0, (3,), (1,), dtype="uint16"),
        raw=Tensor(Storage("b", untyped, halfwords.nbytes), 0, (6,), (1,)))
    out = load_torch_state_dict(write_checkpoint(
        tmp_path / "v3.pt", state, {"a": doubles.tobytes(), "b": halfwords.tobytes()}))
    np.testing.assert_array_equal(out["d"], doubles[[1, 3]])
    assert out["d"].dtype == np.float64
    np.testing.assert_array_equal(out["u"], halfwords)
    assert out["u"].dtype == np.uint16
    np.testing.assert_array_equal(out["raw"], np.frombuffer(halfwords.tobytes(), np.uint8))


def test_v3_dtype_disagreeing_with_typed_storage_is_refused(tmp_path):
    state = {"x": Tensor(Storage("0", "FloatStorage", 2), 0, (2,), (1,), dtype="int32")}
    path = write_checkpoint(tmp_path / "t.pt", state, {"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="int32 disagrees with its FloatStorage"):
        load_torch_state_dict(path)


def test_strided_layout_global_is_allowed_other_layouts_are_not(tmp_path):
    class Layout:
        def __init__(self, name):
            self.name = name

        def __reduce__(self):
            return TorchGlobal("torch.serialization", "_get_layout"), (self.name,)

    state, storages = small_valid_state()
    state._metadata = {"": {"layout": Layout("torch.strided")}}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "ok.pt", state, storages))
    assert list(out) == ["w"]
    state._metadata = {"": {"layout": Layout("torch.sparse_coo")}}
    with pytest.raises(CheckpointError, match="sparse_coo"):
        load_torch_state_dict(write_checkpoint(tmp_path / "sparse.pt", state, storages))


# ---- hostile pickles -------------------------------------------------------------------

class CallOnLoad:
    """Unpickling this calls ``func(*args)``: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def stack_global(module, name):
    """Protocol-4 opcodes pushing ``module.name`` via STACK_GLOBAL (no call)."""
    def short_str(s):
        b = s.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b
    return pickle.PROTO + b"\x04" + short_str(module) + short_str(name) + pickle.STACK_GLOBAL + pickle.STOP


def hostile_cases(victim):
    """(id, data.pkl bytes or state object, refused global).

    The os/builtins/subprocess payloads create ``victim`` under a plain ``pickle.load``
    (checked while writing these tests); the rest only reach for a forbidden name.
    """
    def evil(func, *args):
        # The payload comes first, so an unrestricted loader runs it before needing torch.
        return collections.OrderedDict([("evil", CallOnLoad(func, *args)), *small_valid_state()[0].items()])
    system = f"{os.system.__module__}.system"
    return [
        ("os.system", evil(os.system, f"echo pwned > {victim}"), system),
        ("os.system-protocol4", pickle.dumps(CallOnLoad(os.system, f"echo pwned > {victim}"), protocol=4),
         system),
        ("builtins.eval", evil(builtins.eval, f"open({str(victim)!r}, 'w').close()"), "builtins.eval"),
        ("builtins.exec-protocol0", pickle.dumps(CallOnLoad(builtins.exec, f"open({str(victim)!r}, 'w')"),
                                                 protocol=0, fix_imports=False), "builtins.exec"),
        ("subprocess.Popen", evil(subprocess.Popen, ["touch", str(victim)]), "subprocess.Popen"),
        ("INST-opcode", b"(V" + f"touch {victim}".encode() + b"\nios\nsystem\n.", "os.system"),
        ("numpy.frombuffer", evil(np.frombuffer, b"\0" * 8), "numpy.frombuffer"),
        ("dotted-attribute", stack_global("torch._utils", "_rebuild_tensor_v2.__globals__"),
         "torch._utils._rebuild_tensor_v2.__globals__"),
        ("torch-load", stack_global("torch", "load"), "torch.load"),
    ]


@pytest.mark.parametrize("case", range(len(hostile_cases("x"))), ids=[c[0] for c in hostile_cases("x")])
def test_hostile_pickle_is_refused_without_side_effect(tmp_path, case):
    victim = tmp_path / "pwned"
    _, state, refused = hostile_cases(victim)[case]
    path = write_checkpoint(tmp_path / "evil.pt", state, small_valid_state()[1])
    with pytest.raises(CheckpointError) as info:
        load_torch_state_dict(path)
    assert f"refused global '{refused}'" in str(info.value)
    assert str(path) in str(info.value)
    assert not victim.exists()


def test_build_opcode_cannot_alter_a_tensor_record(tmp_path):
    storage = Storage("0", "FloatStorage", 4)
    for build_state in ({"offset": 99}, (None, {"offset": 99})):
        state = {"w": Tensor(storage, 0, (4,), (1,), build_state=build_state)}
        path = write_checkpoint(tmp_path / "build.pt", state, {"0": b"\0" * 16})
        with pytest.raises(CheckpointError, match="not a readable pickle"):
            load_torch_state_dict(path)


def test_rebuild_call_with_a_non_storage_is_refused(tmp_path):
    class BadTensor:
        def __reduce__(self):
            return TorchGlobal("torch._utils", "_rebuild_tensor_v2"), ("0", 0, (1,), (1,), False, None)

    path = write_checkpoint(tmp_path / "t.pt", {"w": BadTensor()})
    with pytest.raises(CheckpointError, match="not from a storage record"):
        load_torch_state_dict(path)


def test_storage_key_cannot_escape_the_data_folder(tmp_path):
    state = {"w": Tensor(Storage("../data.pkl", "ByteStorage", 4), 0, (4,), (1,))}
    with pytest.raises(CheckpointError, match="invalid storage key"):
        load_torch_state_dict(write_checkpoint(tmp_path / "t.pt", state))


# ---- missing, truncated and corrupt files ------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_state_dict(tmp_path / "absent.pt")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_torch_state_dict(tmp_path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="not a readable PyTorch zip"):
        load_torch_state_dict(path)


def test_truncated_release_checkpoint(tmp_path):
    data = BEST_PT.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_torch_state_dict(path)


def test_corrupted_storage_bytes_fail_the_crc(tmp_path):
    data = bytearray(BEST_PT.read_bytes())
    with zipfile.ZipFile(BEST_PT) as zf:
        info = zf.getinfo("archive/data/5")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_torch_state_dict(path)


def test_random_damage_raises_only_checkpoint_error(tmp_path):
    original = SMALL_PT.read_bytes()
    reference = load_torch_state_dict(SMALL_PT)
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.pt"
    failures = 0
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[: rng.integers(0, len(data))]
        else:
            for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            out = load_torch_state_dict(path)
        except CheckpointError:
            failures += 1
            continue
        # Damage that loads must have hit bytes the reader ignores (padding, timestamps).
        assert list(out) == list(reference)
        for key in reference:
            np.testing.assert_array_equal(out[key], reference[key])
    assert failures > 100


def test_random_damage_to_the_pickle_raises_only_checkpoint_error(tmp_path):
    with zipfile.ZipFile(SMALL_PT) as zf:
        pkl = zf.read("archive/data.pkl")
        storages = {n.rsplit("/", 1)[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
    rng = np.random.default_rng(1)
    failures = 0
    for trial in range(400):
        data = bytearray(pkl)
        if trial % 4 == 0:
            data = data[: rng.integers(0, len(data))]
        else:
            for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[pos] = int(rng.integers(0, 256))
        path = write_checkpoint(tmp_path / f"p{trial}.pt", bytes(data), storages)
        try:
            out = load_torch_state_dict(path)
        except CheckpointError:
            failures += 1
            continue
        # Damage to names or device strings can leave a valid, different checkpoint.
        assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in out.items())
    assert failures > 200


def test_memo_index_bomb_is_refused_before_allocating(tmp_path):
    # EMPTY_DICT, LONG_BINPUT 2**31 - 1: the C unpickler would zero-fill a 16 GiB memo table.
    bomb = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 2 ** 31 - 1) + \
        pickle.STOP
    with pytest.raises(CheckpointError, match="memo slot 2147483647"):
        load_torch_state_dict(write_checkpoint(tmp_path / "bomb.pt", bomb))


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "empty.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_torch_state_dict(path)


def test_garbage_data_pkl(tmp_path):
    path = write_checkpoint(tmp_path / "g.pt", b"\x80\x02this is not a pickle")
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        load_torch_state_dict(path)


def test_missing_storage_record(tmp_path):
    state, _ = small_valid_state()
    path = write_checkpoint(tmp_path / "m.pt", state, {})
    with pytest.raises(CheckpointError, match="'archive/data/0' is missing"):
        load_torch_state_dict(path)


def test_storage_record_shorter_than_declared(tmp_path):
    state = {"w": Tensor(Storage("0", "FloatStorage", 10), 0, (10,), (1,))}
    path = write_checkpoint(tmp_path / "s.pt", state, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="holds 16 bytes"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("offset, size, stride", [
    (0, (5,), (1,)),        # one element past the end
    (3, (2,), (1,)),        # offset pushes it past the end
    (0, (2, 2), (1, 3)),    # the stride reaches past the end
])
def test_tensor_larger_than_its_storage(tmp_path, offset, size, stride):
    state = {"w": Tensor(Storage("0", "FloatStorage", 4), offset, size, stride)}
    path = write_checkpoint(tmp_path / "big.pt", state, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="holds only 4 float32 elements"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("offset, size, stride", [(-1, (2,), (1,)), (2, (2,), (-1,)), (0, (-2,), (1,))])
def test_negative_layout_is_refused(tmp_path, offset, size, stride):
    state = {"w": Tensor(Storage("0", "FloatStorage", 4), offset, size, stride)}
    path = write_checkpoint(tmp_path / "neg.pt", state, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="negative"):
        load_torch_state_dict(path)


def test_top_level_must_be_a_dict_of_tensors(tmp_path):
    _, storages = small_valid_state()
    with pytest.raises(CheckpointError, match="holds a list"):
        load_torch_state_dict(write_checkpoint(tmp_path / "l.pt", [1, 2], storages))
    state, storages = small_valid_state()
    state["epoch"] = 3
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, not a tensor"):
        load_torch_state_dict(write_checkpoint(tmp_path / "e.pt", state, storages))


def test_unknown_byteorder_record(tmp_path):
    state, storages = small_valid_state()
    path = write_checkpoint(tmp_path / "b.pt", state, storages, byteorder="middle")
    with pytest.raises(CheckpointError, match="byteorder"):
        load_torch_state_dict(path)
