"""Crafted NeuronIO pickles, PyTorch checkpoints and SHD files, each read by the `elm` command in a
subprocess under a memory limit and a timeout: exit 2 and one `error:` line, never a crash.

The memory-safety cases segfaulted the process before the NeuronIO reader built its
dtypes and arrays through checked stand-ins; the bombs claimed 3-4 GB (or ran for
minutes) before the size checks. Both would fail here as a signal or a timeout,
not as the asserted error line.
"""

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from elmcore.errors import CheckpointError, DataError

try:
    from numpy._core.multiarray import _reconstruct, scalar as np_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import _reconstruct, scalar as np_scalar

sys.path.insert(0, os.path.dirname(__file__))
from test_torch_checkpoint import Parameter, Storage, Tensor, torch_pickle, write_checkpoint  # noqa: E402

# Enough for the interpreter, NumPy and Numba; every bomb below claims more.
MEMORY_LIMIT = 3 << 30
TIMEOUT_S = 180

_RUN_ELM = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from elm_cli.main import main; sys.argv = ['elm'] + sys.argv[1:]; main()")


def run_elm(*args):
    code = _RUN_ELM.format(limit=MEMORY_LIMIT)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_refused(result, *fragments):
    """Exit 2, exactly one stderr line `error: …` holding every fragment, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- NeuronIO pickles, written with the pickler's own opcodes ------------------------------

class Reduce:
    """Pickles as ``func(*args)``, then BUILD with ``state`` when one is given."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def pickled_dtype(descr, state):
    return Reduce(np.dtype, (descr, False, True), state)


def pickled_array(dtype, shape, data):
    return Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


PLAIN_F8 = (3, "<", None, None, None, -1, -1, 0)
OBJECT_FLAGS = 63  # what np.dtype("O").__reduce__() says: holds references


def object_field_dtype():
    """A struct dtype whose field is an object pointer, with its flags cleared so NumPy trusts the bytes."""
    obj = pickled_dtype("O8", (3, "|", None, None, None, -1, -1, OBJECT_FLAGS))
    return pickled_dtype("V8", (3, "|", None, ("a",), {"a": (obj, 0)}, 8, 1, 0))


def neuronio_bytes(soma=None, seconds=0.01, sims=1, spikes=None):
    T = int(round(seconds * 1000))
    sim = {"exInputSpikeTimes": spikes if spikes is not None else {0: [1]}, "inhInputSpikeTimes": {},
           "outputSpikeTimes": [], "somaVoltageLowRes": [-70.0] * T if soma is None else soma}
    obj = {"Params": {"allSegmentsType": ["basal"] * 3, "totalSimDurationInSec": seconds},
           "Results": {"listOfSingleSimulationDicts": [sim] * sims}}
    return pickle.dumps(obj, protocol=2)


ATTACKER_POINTER = struct.pack("<Q", 0x4141414141414141)

NEURONIO_CASES = {
    # name: (pickle bytes, what the error line says)
    "object-field dtype over attacker bytes": (
        neuronio_bytes(pickled_array(object_field_dtype(), (10,), ATTACKER_POINTER * 10)),
        "is not a plain numeric type"),
    "object dtype itself": (
        neuronio_bytes(pickled_array(pickled_dtype("O8", (3, "|", None, None, None, -1, -1, 0)), (10,),
                                     ATTACKER_POINTER * 10)), "dtype 'O8'"),
    "numeric descriptor with a field state": (
        neuronio_bytes(pickled_array(pickled_dtype("f8", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 0)},
                                                          8, 1, 0)), (10,), b"\0" * 80)),
        "not that of a plain numeric type"),
    "field offset past the item size": (
        neuronio_bytes(pickled_array(pickled_dtype("V8", (3, "|", None, ("a",),
                                                          {"a": (pickled_dtype("f8", PLAIN_F8), 4096)}, 8, 1, 0)),
                                     (10,), b"\0" * 80)), "dtype 'V8'"),
    "item size widened by the state": (
        neuronio_bytes(pickled_array(pickled_dtype("f8", (3, "<", None, None, None, 4096, -1, 0)), (10,),
                                     b"\0" * 80)), "not that of a plain numeric type"),
    "array shorter than its shape": (
        neuronio_bytes(pickled_array(pickled_dtype("f8", PLAIN_F8), (10 ** 6,), b"\0" * 80)), "needs 8000000 bytes"),
    "array state without a dtype stand-in": (
        neuronio_bytes(Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10,), "<f8", False, b"\0" * 80))),
        "needs a numeric dtype"),
    "_reconstruct of something other than ndarray": (
        neuronio_bytes(Reduce(_reconstruct, (np.dtype, (0,), b"b"), (1, (10,), "<f8", False, b"\0" * 80))),
        "builds only numpy.ndarray"),
    "scalar of an object dtype": (
        neuronio_bytes(Reduce(np_scalar, (pickled_dtype("O8", (3, "|", None, None, None, -1, -1, OBJECT_FLAGS)),
                                          ATTACKER_POINTER))), "dtype 'O8'"),
    "memo index 2**28 (9 bytes)": (b"\x80\x02Nr\x00\x00\x00\x10.", "memo slot 268435456"),
    "bytes length 2**40": (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b".", "longer than the"),
    "duration 1e300 s": (neuronio_bytes(soma=[-70.0] * 10, seconds=1e300), "more soma samples than"),
    "duration an int beyond float range": (neuronio_bytes(soma=[-70.0] * 10, seconds=10 ** 400),
                                           "must be a positive number"),
    "soma 1e300 (inf in float32)": (neuronio_bytes(soma=[-70.0] * 9 + [1e300]), "beyond float32 range"),
    "one simulation repeated 200,000 times by reference": (
        neuronio_bytes(sims=200_000), "more soma samples than"),
    "segment list that is a 0-d array": (
        pickle.dumps({"Params": {"allSegmentsType": np.array(3.0), "totalSimDurationInSec": 0.01},
                      "Results": {"listOfSingleSimulationDicts": []}}, protocol=2), "must be a non-empty list"),
    "one spike list repeated by reference": (
        neuronio_bytes(spikes=dict.fromkeys(range(3), list(range(10)) * 30_000)), "repeated by reference"),
}

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEURONIO_CASES))
def test_hostile_neuronio_pickles_are_refused_by_elm_data_info(tmp_path, name):
    data, fragment = NEURONIO_CASES[name]
    (tmp_path / "x_sim__0.p").write_bytes(data)
    result = run_elm("data", "info", tmp_path, "--task", "neuronio")
    assert_refused(result, "x_sim__0.p", *([fragment] if fragment else []))


@pytest.mark.slow
def test_folder_link_loops_are_walked_once(tmp_path):
    from elmcore.data.neuronio import write_neuronio_file
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    sim = {"exInputSpikeTimes": {0: [1]}, "inhInputSpikeTimes": {}, "outputSpikeTimes": [],
           "somaVoltageLowRes": [-70.0] * 10}
    for k in range(3):
        write_neuronio_file(data / "sub" / f"x_sim__{k}.p", {"allSegmentsType": ["b"], "totalSimDurationInSec": 0.01},
                            [sim])
    for name in ("a", "b", "c"):  # glob('**') would follow these into 3**depth paths
        (data / name).symlink_to(".")
        (data / "sub" / name).symlink_to("..")
    result = run_elm("data", "info", data, "-O", "window=5", "-O", "burn_in=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "neuronio" in result.stdout and "files_train: 1" in result.stdout and "files_test: 1" in result.stdout


def test_the_neuronio_reader_still_reads_plain_arrays_scalars_and_both_byte_orders(tmp_path):
    from elmcore.data.neuronio import read_neuronio_file
    soma = np.linspace(-80, -50, 10)
    sims = [{"exInputSpikeTimes": {np.int64(0): np.array([1.0, 2.0], ">f8"), 2: np.array([3], np.int16)},
             "inhInputSpikeTimes": {1: [np.float16(4.0)]}, "outputSpikeTimes": np.array([5.5], np.float32),
             "somaVoltageLowRes": np.asfortranarray(soma.astype(">f4"))}]
    path = tmp_path / "ok_sim__0.p"
    path.write_bytes(pickle.dumps({"Params": {"allSegmentsType": ["a"] * 3, "totalSimDurationInSec": 0.01},
                                   "Results": {"listOfSingleSimulationDicts": sims}}, protocol=2))
    f = read_neuronio_file(path)
    np.testing.assert_array_equal(f.soma_mV[0], soma.astype(np.float32))
    assert f.spikes[0].nonzero()[0].tolist() == [5]
    X = f.input(0)
    assert X[1, 0] == X[2, 0] == X[3, 2] == 1 and X[4, 3 + 1] == -1 and np.count_nonzero(X) == 4


def test_a_second_state_for_one_array_is_refused(tmp_path):
    from elmcore.data.neuronio import load_neuronio_pickle
    data = pickle.dumps([pickled_array(pickled_dtype("f8", PLAIN_F8), (2,), b"\0" * 16)], protocol=2)
    # Repeat the BUILD, fetching the state tuple again from the memo (it was memoised just before).
    build = data.rindex(pickle.BUILD)
    memo_of_state = data.rindex(pickle.BINPUT, 0, build)
    state_slot = data[memo_of_state + 1]
    twice = data[:build + 1] + pickle.BINGET + bytes([state_slot]) + pickle.BUILD + data[build + 1:]
    path = tmp_path / "t_sim__0.p"
    path.write_bytes(twice)
    with pytest.raises(DataError, match="state twice"):
        load_neuronio_pickle(path)


# ---- PyTorch checkpoints ---------------------------------------------------------------------

RELEASE_CONFIG = {"num_input": 2, "num_output": 1, "num_memory": 2, "mlp_num_layers": 1, "mlp_hidden_size": 2}


def convert(tmp_path, pt):
    (tmp_path / "model_config.json").write_text(json.dumps(RELEASE_CONFIG))
    return run_elm("convert", pt, "--config", tmp_path / "model_config.json", "-o", tmp_path / "out.npz")


@pytest.mark.slow
def test_stride_zero_tensor_of_huge_size_is_refused_before_copying(tmp_path):
    # 4 stored bytes viewed as 2**30 floats: 4 GB on copying.
    state = {"w": Tensor(Storage("0", "FloatStorage", 1), 0, (1 << 15, 1 << 15), (0, 0))}
    pt = write_checkpoint(tmp_path / "s0.pt", state, {"0": b"\0" * 4})
    assert_refused(convert(tmp_path, pt), "holds only 1 float32 elements")


@pytest.mark.slow
@pytest.mark.parametrize("size", [(0, 2 ** 64), (2 ** 64,), (0, 2 ** 63, 2 ** 63)])
def test_tensor_sizes_beyond_int64_are_refused(tmp_path, size):
    state = {"w": Tensor(Storage("0", "FloatStorage", 1), 0, size, (1,) * len(size))}
    pt = write_checkpoint(tmp_path / "o.pt", state, {"0": b"\0" * 4})
    assert_refused(convert(tmp_path, pt), "'w'")


def test_huge_stride_on_a_dimension_of_one_reads_the_element(tmp_path):
    from elmcore.verification.torch_checkpoint import load_torch_state_dict
    state = {"w": Tensor(Storage("0", "FloatStorage", 2), 1, (1, 1), (2 ** 70, 2 ** 65))}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "h.pt", state, {"0": np.float32([1, 2]).tobytes()}))
    assert out["w"].tolist() == [[2.0]]


def deflated_checkpoint(path, pickle_bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
    return path


@pytest.mark.slow
def test_zip_bomb_data_pkl_is_refused_by_its_declared_sizes(tmp_path):
    # 64 MiB of a one-byte opcode: a pickle that inflates from about 64 KB.
    big = deflated_checkpoint(tmp_path / "big.pt", b"\x80\x02" + b"N" * (64 << 20) + b".")
    assert os.path.getsize(big) < 1 << 20
    assert_refused(convert(tmp_path, big), "declares 67108867 bytes")
    # Under the size cap, but inflating more than a real pickle could.
    dense = deflated_checkpoint(tmp_path / "dense.pt", b"\x80\x02]" + b"N" * (3 << 20) + b"e.")
    assert_refused(convert(tmp_path, dense), "zip bomb")


def test_a_storage_record_that_inflates_a_thousandfold_is_refused(tmp_path):
    from elmcore.verification.torch_checkpoint import load_torch_state_dict
    n = 16 << 20
    path = tmp_path / "st.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", torch_pickle({"w": Tensor(Storage("0", "ByteStorage", n), 0, (n,), (1,))}))
        zf.writestr("archive/data/0", b"\0" * n)
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_torch_state_dict(path)


def test_entries_repeating_one_storage_are_refused(tmp_path):
    from elmcore.verification.torch_checkpoint import load_torch_state_dict
    n = 1 << 20
    st = Storage("0", "FloatStorage", n)
    state = {f"w{i}": Tensor(st, 0, (n,), (1,)) for i in range(100)}  # 400 MB from 4 MB
    path = write_checkpoint(tmp_path / "r.pt", state, {"0": b"\0" * (4 * n)})
    with pytest.raises(CheckpointError, match="repeating one storage"):
        load_torch_state_dict(path)
    # Tied weights (one storage read twice) are fine.
    tied = {"a": Tensor(st, 0, (n,), (1,)), "b": Parameter(Tensor(st, 0, (n,), (1,)))}
    out = load_torch_state_dict(write_checkpoint(tmp_path / "t.pt", tied, {"0": b"\0" * (4 * n)}))
    assert out["a"].shape == out["b"].shape == (n,)


class OrderedDictWithState:
    """Pickles as an OrderedDict of ``items`` whose BUILD state is ``state``."""

    def __init__(self, items, state):
        self.items, self.state = items, state

    def __reduce__(self):
        return collections.OrderedDict, (), self.state, None, iter(self.items.items())


def _one_tensor():
    return {"w": Tensor(Storage("0", "FloatStorage", 1), 0, (1,), (1,))}, {"0": np.float32([3]).tobytes()}


def test_ordered_dict_state_cannot_shadow_its_methods(tmp_path):
    from elmcore.verification.torch_checkpoint import load_torch_state_dict
    items, storages = _one_tensor()
    # Slot state {'items': 5} used to become an attribute hiding OrderedDict.items.
    state = OrderedDictWithState(items, (None, {"items": 5, "keys": 6}))
    out = load_torch_state_dict(write_checkpoint(tmp_path / "a.pt", state, storages))
    assert list(out) == ["w"] and out["w"].tolist() == [3.0]
    bad = OrderedDictWithState(items, [1, 2, 3])
    with pytest.raises(CheckpointError, match="OrderedDict has the state list"):
        load_torch_state_dict(write_checkpoint(tmp_path / "b.pt", bad, storages))


@pytest.mark.slow
def test_ordered_dict_with_a_bad_state_through_elm_convert(tmp_path):
    items, storages = _one_tensor()
    pt = write_checkpoint(tmp_path / "c.pt", OrderedDictWithState(items, "not a state"), storages)
    assert_refused(convert(tmp_path, pt), "OrderedDict has the state str")


@pytest.mark.slow
def test_memo_bomb_in_data_pkl_through_elm_convert(tmp_path):
    pt = write_checkpoint(tmp_path / "m.pt", b"\x80\x02Nr\x00\x00\x00\x10.")
    assert_refused(convert(tmp_path, pt), "memo slot 268435456")


# ---- SHD ---------------------------------------------------------------------------------------

def test_shd_soft_link_loop_is_one_error_line(tmp_path):
    h5py = pytest.importorskip("h5py")
    for name in ("shd_train.h5", "shd_test.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            spikes = f.create_group("spikes")
            spikes["times"] = h5py.SoftLink("/spikes/units")
            spikes["units"] = h5py.SoftLink("/spikes/times")
            f["labels"] = np.zeros(3, np.uint8)
    assert_refused(run_elm("data", "info", tmp_path, "--task", "shd"), "shd_train.h5", "too many links")


def test_shd_group_instead_of_dataset_and_huge_declared_count(tmp_path):
    h5py = pytest.importorskip("h5py")
    from elmcore.data.shd import read_shd_h5
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("spikes/times")
        f.create_group("spikes/units")
        f["labels"] = np.zeros(1, np.uint8)
    with pytest.raises(DataError, match="'spikes/times' must be a one-dimensional dataset"):
        read_shd_h5(tmp_path / "g.h5")
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f.create_dataset("spikes/times", shape=(10 ** 9,), dtype=h5py.vlen_dtype(np.float32))
        f.create_dataset("spikes/units", shape=(1,), dtype=h5py.vlen_dtype(np.uint16))
        f["labels"] = np.zeros(1, np.uint8)
    with pytest.raises(DataError, match="declares 1000000000 samples"):
        read_shd_h5(tmp_path / "n.h5")


def test_damaged_neuronio_files_raise_only_data_error(tmp_path):
    """Bit flips, truncations and spliced opcodes of a real-layout file: a DataError or a clean read."""
    from elmcore.data.neuronio import read_neuronio_file, write_neuronio_file
    sims = [{"exInputSpikeTimes": {np.int64(0): [np.int64(1), np.int64(5)], np.int64(2): [9]},
             "inhInputSpikeTimes": {np.int64(1): [5]}, "outputSpikeTimes": np.array([3.5], np.float16),
             "somaVoltageLowRes": np.linspace(-70, -50, 10).astype(np.float16)}]
    good = tmp_path / "g_sim__0.p"
    write_neuronio_file(good, {"allSegmentsType": ["basal"] * 3, "totalSimDurationInSec": 0.01}, sims)
    original = good.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "d_sim__0.p"
    outcomes = {"read": 0, "refused": 0}
    for trial in range(400):
        data = bytearray(original)
        kind = trial % 4
        if kind == 0:
            for i in rng.integers(0, len(data), size=3):
                data[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            data = data[:int(rng.integers(1, len(data)))]
        elif kind == 2:
            i = int(rng.integers(len(data)))
            data[i:i] = bytes([int(rng.integers(256))])
        else:
            i, j = sorted(rng.integers(0, len(data), size=2))
            data = data[:i] + data[j:]
        path.write_bytes(bytes(data))
        try:
            read_neuronio_file(path)
            outcomes["read"] += 1
        except DataError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 300


def test_fifos_named_like_data_files_are_refused_without_blocking(tmp_path):
    from elmcore.data.neuronio import read_neuronio_file
    from elmcore.data.shd import read_shd_h5
    from elmcore.verification.torch_checkpoint import load_torch_state_dict
    for name, read, error in (("x_sim__0.p", read_neuronio_file, DataError),
                              ("m.pt", load_torch_state_dict, CheckpointError),
                              ("shd_train.h5", read_shd_h5, DataError)):
        os.mkfifo(tmp_path / name)
        with pytest.raises(error, match="not a regular file"):
            read(tmp_path / name)


def _png_header_only(width, height):
    """A PNG that declares its size and holds no pixels: decoding it would allocate width × height."""
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 20000])
def test_pathfinder_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path, side):
    pytest.importorskip("PIL")
    from elmcore.data.pathfinder import load_grey_png
    (tmp_path / "big.png").write_bytes(_png_header_only(side, side))
    with pytest.raises(DataError, match="big.png"):
        load_grey_png(tmp_path / "big.png", 32)
