"""LRA readers and generators: ListOps, Pathfinder / Path-X, sequential images."""

import hashlib
import os
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from elmcore.data import listops as lo
from elmcore.data import pathfinder as pf
from elmcore.data.images import ImageSequenceTask, quantize_grey
from elmcore.errors import DataError


def digest(root):
    """SHA-256 over every file below ``root`` (relative names and bytes)."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


# ---- ListOps -------------------------------------------------------------------------

def write_listops(folder, rows, header="Source\tTarget"):
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        (folder / name).write_text("\n".join([header] + [f"{s}\t{t}" for s, t in rows]) + "\n")


def evaluate_listops(source):
    """Independent ListOps evaluator: an explicit stack over the token stream.

    Written without the generator's tree: each ``[OP`` pushes a frame, digits are
    appended to the top frame, ``]`` pops and reduces it. Parentheses (the LRA
    release's bracketing) are skipped.
    """
    stack = [["ROOT"]]
    for token in source.split():
        if token in "()":
            continue
        if token.startswith("["):
            stack.append([token[1:]])
        elif token == "]":
            op, *args = stack.pop()
            args.sort()
            if op == "MIN":
                value = args[0]
            elif op == "MAX":
                value = args[-1]
            elif op == "SM":
                value = sum(args) % 10
            else:
                assert op == "MED", op
                mid = len(args) // 2
                value = args[mid] if len(args) % 2 else (args[mid - 1] + args[mid]) // 2
            stack[-1].append(value)
        else:
            stack[-1].append(int(token))
    assert len(stack) == 1 and len(stack[0]) == 2, source
    return stack[0][1]


def test_listops_reader_one_hot_and_left_padding(tmp_path):
    write_listops(tmp_path, [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM 1 2 ]", 3)])
    task = lo.ListOpsTask(tmp_path)
    assert (task.num_input, task.num_output, task.seq_len) == (16, 10, 9)
    batch = next(task.batches("train", 8))
    assert batch.X.shape == (2, 9, 16) and batch.X.dtype == np.float32
    assert batch.target.tolist() == [9, 3]
    # Hand-computed indices: pad 0, digit d -> d+1, [MIN 11, [MAX 12, [MED 13, [SM 14, ] 15.
    assert np.argmax(batch.X[0], axis=1).tolist() == [12, 3, 10, 11, 5, 8, 15, 1, 15]
    # The short sequence is padded at the START, so its last step is its real end.
    assert np.argmax(batch.X[1], axis=1).tolist() == [0, 0, 0, 0, 0, 14, 2, 3, 15]
    assert (batch.X.sum(axis=2) == 1).all()


def test_listops_reader_drops_lra_parentheses(tmp_path):
    plain, bracketed = tmp_path / "plain", tmp_path / "bracketed"
    plain.mkdir()
    bracketed.mkdir()
    write_listops(plain, [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9)])
    write_listops(bracketed, [("( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )", 9)])
    a = next(lo.ListOpsTask(plain).batches("test", 1)).X
    b = next(lo.ListOpsTask(bracketed).batches("test", 1)).X
    np.testing.assert_array_equal(a, b)


def test_listops_max_length_pads_and_rejects_longer(tmp_path):
    write_listops(tmp_path, [("[SM 1 2 ]", 3)])
    task = lo.ListOpsTask(tmp_path, max_length=6)
    x = next(task.batches("valid", 1)).X[0]
    assert np.argmax(x, axis=1).tolist() == [0, 0, 14, 2, 3, 15]
    with pytest.raises(DataError, match=r"basic_train.tsv.*4 tokens.*max_length=3"):
        lo.ListOpsTask(tmp_path, max_length=3)


@pytest.mark.parametrize("rows, header, message", [
    ([("[SM 1 2 ]", 3)], "Input\tOutput", "header"),
    ([("[SM 1 2 ]", 11)], "Source\tTarget", r"line 2: Target 11 outside 0..9"),
    ([("[SM 1 2 ]", 3), ("[XOR 1 2 ]", 3)], "Source\tTarget", r"line 3: unknown token '\[XOR'"),
    ([("[SM 1 2 ]", "x")], "Source\tTarget", "not an integer"),
])
def test_listops_malformed_files_name_the_problem(tmp_path, rows, header, message):
    write_listops(tmp_path, rows, header)
    with pytest.raises(DataError, match=message):
        lo.ListOpsTask(tmp_path)


def test_listops_missing_files_say_where_to_get_them(tmp_path):
    (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n[SM 1 ]\t1\n")
    with pytest.raises(DataError) as e:
        lo.ListOpsTask(tmp_path)
    msg = str(e.value)
    assert "basic_val.tsv" in msg and "basic_test.tsv" in msg and str(tmp_path) in msg
    assert "lra_release.gz" in msg and "elm data generate listops" in msg


def test_listops_generator_targets_lengths_balance_and_determinism(tmp_path):
    options = dict(n=200, min_length=12, max_length=60, max_depth=6, max_args=5)
    lo.generate_listops(tmp_path / "a", seed=3, **options)
    lo.generate_listops(tmp_path / "b", seed=3, **options)
    lo.generate_listops(tmp_path / "c", seed=4, **options)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    sizes = {"basic_train.tsv": 160, "basic_val.tsv": 20, "basic_test.tsv": 20}
    for name, size in sizes.items():
        lines = (tmp_path / "a" / name).read_text().splitlines()
        assert lines[0] == "Source\tTarget" and len(lines) == size + 1
        targets = []
        for line in lines[1:]:
            source, target = line.split("\t")
            assert evaluate_listops(source) == int(target), line
            assert 12 <= len(source.split()) <= 60
            targets.append(int(target))
        # Stated balance: every class exactly size // 10 times (sizes are multiples of 10 here).
        assert np.bincount(targets, minlength=10).tolist() == [size // 10] * 10
    task = lo.ListOpsTask(tmp_path / "a")
    assert task.num_examples("train") == 160 and task.seq_len <= 60


def test_listops_generator_lra_bracketing_and_unbalanced(tmp_path):
    lo.generate_listops(tmp_path, n=60, seed=0, min_length=8, max_length=40, max_depth=5, max_args=4,
                        parens=True, balanced=False)
    lines = (tmp_path / "basic_train.tsv").read_text().splitlines()[1:]
    assert all(line.startswith("( ") for line in lines)
    for line in lines:
        source, target = line.split("\t")
        assert evaluate_listops(source) == int(target)
    task = lo.ListOpsTask(tmp_path)
    assert task.num_examples("train") + task.num_examples("valid") + task.num_examples("test") == 60


def test_listops_generator_rejects_impossible_lengths(tmp_path):
    with pytest.raises(DataError, match="min_length=100"):
        lo.generate_listops(tmp_path, n=10, min_length=100, max_length=200, max_depth=2, max_args=3)
    with pytest.raises(DataError, match="min_length <= max_length"):
        lo.generate_listops(tmp_path, n=10, min_length=50, max_length=20)


# ---- Pathfinder: the published layout, read back -----------------------------------------

def write_pathfinder(root, images, labels, per_folder=2):
    """Write images in the LRA layout by hand (metadata lines as in the release)."""
    for k, (pixels, label) in enumerate(zip(images, labels)):
        folder = root / "imgs" / str(k // per_folder)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"sample_{k % per_folder}.png")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for f in range((len(images) + per_folder - 1) // per_folder):
        lines = [f"imgs/{f} sample_{j}.png {j} {labels[f * per_folder + j]} 14 4 1 1.5"
                 for j in range(min(per_folder, len(images) - f * per_folder))]
        (root / "metadata" / f"{f}.npy").write_text("\n".join(lines) + "\n")


def test_pathfinder_reader_quantisation_edges_and_pixel_order(tmp_path):
    img = np.zeros((32, 32), np.uint8)
    edges = [0, 15, 16, 31, 32, 127, 128, 240, 254, 255]
    img[0, :len(edges)] = edges
    img[5, 7] = 200
    images = [img, np.full((32, 32), 17, np.uint8), img[::-1].copy()]
    write_pathfinder(tmp_path, images, [1, 0, 1])
    task = pf.PathfinderTask(tmp_path, resolution=32, valid_fraction=0.0, test_fraction=0.0)
    assert (task.num_input, task.num_output, task.seq_len) == (16, 2, 1024)
    assert task.num_examples("train") == 3
    batch = next(task.batches("train", 3))
    assert batch.X.shape == (3, 1024, 16) and (batch.X.sum(axis=2) == 1).all()
    assert batch.target.tolist() == [1, 0, 1]
    levels = np.argmax(batch.X[0], axis=1)
    # 16 levels: floor(p / 16) -> 0, 0, 1, 1, 2, 7, 8, 15, 15, 15; row-major step r*32 + c.
    assert levels[:len(edges)].tolist() == [0, 0, 1, 1, 2, 7, 8, 15, 15, 15]
    assert levels[5 * 32 + 7] == 12 and levels[5 * 32 + 8] == 0
    assert (np.argmax(batch.X[1], axis=1) == 1).all()


def test_pathx_reader_uses_eight_levels(tmp_path):
    img = np.zeros((128, 128), np.uint8)
    img[0, :6] = [31, 32, 63, 64, 223, 224]
    write_pathfinder(tmp_path / "pathfinder128" / "curv_contour_length_14", [img, img], [0, 1])
    task = pf.PathfinderTask(tmp_path, resolution=128, valid_fraction=0.0, test_fraction=0.0)
    assert task.num_input == 8 and task.seq_len == 128 * 128
    x = next(task.batches("train", 1)).X[0]
    assert np.argmax(x[:6], axis=1).tolist() == [0, 1, 1, 2, 6, 7]


def test_quantize_grey_matches_floor_rule():
    p = np.arange(256, dtype=np.uint8)
    for levels in (2, 8, 16, 256):
        np.testing.assert_array_equal(quantize_grey(p, levels), (np.arange(256) * levels) // 256)
    with pytest.raises(DataError):
        quantize_grey(p, 1)


def test_pathfinder_reader_errors(tmp_path):
    img = np.zeros((32, 32), np.uint8)
    write_pathfinder(tmp_path, [img, img, img], [0, 1, 0])
    os.remove(tmp_path / "imgs" / "0" / "sample_1.png")
    with pytest.raises(DataError, match=r"1 image\(s\).*sample_1.png.*skip_missing"):
        pf.PathfinderTask(tmp_path)
    task = pf.PathfinderTask(tmp_path, skip_missing=True, valid_fraction=0.0, test_fraction=0.0)
    assert task.num_examples("train") == 2
    with pytest.raises(DataError, match=r"sample_0.png is 32×32, expected 64×64"):
        next(pf.PathfinderTask(tmp_path, resolution=64, skip_missing=True).batches("train", 4))
    (tmp_path / "imgs" / "0" / "sample_0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*sample_0.png"):
        pf.PathfinderTask(tmp_path, skip_missing=True, valid_fraction=0.0, test_fraction=0.0).inputs(
            "train", np.array([0]))
    np.save(tmp_path / "metadata" / "0.npy", np.zeros(3))
    with pytest.raises(DataError, match="binary NumPy file"):
        pf.PathfinderTask(tmp_path)
    (tmp_path / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 2\n")
    with pytest.raises(DataError, match=r"0.npy line 1: label \(field 3\) must be 0 or 1"):
        pf.PathfinderTask(tmp_path)
    with pytest.raises(DataError, match=r"no Pathfinder metadata/ folder.*lra_release.gz"):
        pf.PathfinderTask(tmp_path / "imgs")


# ---- Pathfinder: an independent, image-only connectivity check ------------------------------

def _dilate(mask, r):
    out, (h, w) = mask.copy(), mask.shape
    padded = np.pad(mask, r)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def _components(mask):
    labels, count = np.full(mask.shape, -1), 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0] >= 0:
            continue
        queue, labels[y0, x0] = deque([(y0, x0)]), count
        while queue:
            y, x = queue.popleft()
            for v in (y - 1, y, y + 1):
                for u in (x - 1, x, x + 1):
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and labels[v, u] < 0:
                        labels[v, u] = count
                        queue.append((v, u))
        count += 1
    return labels


def connected_by_image(pixels, markers, bridge=1, threshold=64):
    """1 if the two marker dots are joined by bright pixels once dash gaps are bridged."""
    labels = _components(_dilate(pixels >= threshold, bridge))
    ids = [labels[int(y), int(x)] for x, y in markers]
    assert min(ids) >= 0, "a marker centre is not on a bright pixel"
    return int(ids[0] == ids[1])


def dashed_line(draw, start, end, dash=3, gap=2):
    (x0, y0), (x1, y1) = start, end
    length = float(np.hypot(x1 - x0, y1 - y0))
    t = 0.0
    while t < length:
        a, b = t / length, min(t + dash, length) / length
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=255, width=1)
        t += dash + gap


def test_pathfinder_hand_built_cases_known_by_construction(tmp_path):
    def scene(lines, markers):
        img = Image.new("L", (32, 32), 0)
        draw = ImageDraw.Draw(img)
        for start, end in lines:
            dashed_line(draw, start, end)
        for x, y in markers:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=255)
        return np.asarray(img)

    same_line = ([((4, 16), (27, 16))], [(4, 16), (27, 16)])                  # answer 1
    two_lines = ([((4, 4), (27, 4)), ((4, 27), (27, 27))], [(4, 4), (27, 27)])  # answer 0
    diagonal = ([((4, 4), (27, 27))], [(4, 4), (27, 27)])                     # answer 1
    cases = [(same_line, 1), (two_lines, 0), (diagonal, 1)]
    images = [scene(*c) for c, _ in cases]
    for (case, answer), pixels in zip(cases, images):
        assert connected_by_image(pixels, case[1], bridge=1) == answer
    write_pathfinder(tmp_path, images, [a for _, a in cases])
    task = pf.PathfinderTask(tmp_path, valid_fraction=0.0, test_fraction=0.0)
    names = [os.path.relpath(p, tmp_path) for p in task.paths[task.split_index["train"]]]
    by_name = dict(zip(names, task.labels["train"].tolist()))
    assert by_name == {"imgs/0/sample_0.png": 1, "imgs/0/sample_1.png": 0, "imgs/1/sample_0.png": 1}
    x = task.inputs("train", np.array([0]))[0]
    # The marker centre (4, 16) is white: top level at step 16*32 + 4.
    assert np.argmax(x[16 * 32 + 4]) == 15


# ---- Pathfinder generator -------------------------------------------------------------------

@pytest.mark.slow
def test_pathfinder_generator_layout_balance_determinism(tmp_path):
    out_a = pf.generate_pathfinder(tmp_path / "a", n=24, seed=5, per_folder=10)
    pf.generate_pathfinder(tmp_path / "b", n=24, seed=5, per_folder=10)
    pf.generate_pathfinder(tmp_path / "c", n=24, seed=6, per_folder=10)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert out_a == os.path.join(tmp_path / "a", "curv_contour_length_14")
    metas = sorted(os.listdir(os.path.join(out_a, "metadata")))
    assert metas == ["0.npy", "1.npy", "2.npy"]
    lines = []
    for name in metas:
        with open(os.path.join(out_a, "metadata", name)) as f:
            lines += [line.split() for line in f.read().splitlines()]
    assert len(lines) == 24
    assert lines[0][:3] == ["imgs/0", "sample_0.png", "0"] and lines[13][:3] == ["imgs/1", "sample_3.png", "3"]
    labels = [int(f[3]) for f in lines]
    assert sorted(labels) == [0] * 12 + [1] * 12      # stated: exactly balanced
    record = pf.read_record(out_a)
    for fields, entry in zip(lines, record["images"]):
        assert entry["path"] == f"{fields[0]}/{fields[1]}" and entry["label"] == int(fields[3])
        contours = entry["marker_contours"]
        assert entry["label"] == int(contours[0] == contours[1])
        assert set(contours) <= {0, 1}
        pixels = np.asarray(Image.open(os.path.join(out_a, entry["path"])))
        assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
        for x, y in entry["markers"]:
            assert pixels[int(y), int(x)] >= 200   # the dot is drawn where the record says
    task = pf.PathfinderTask(tmp_path / "a", valid_fraction=0.25, test_fraction=0.25)
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [12, 6, 6]


@pytest.mark.parametrize("size, options, bridge", [
    # Contours kept 6 px apart, dash gaps 1.5 px: a 1-px bridge joins the dashes of one
    # contour and never two contours, so the image alone gives the label.
    (64, {"clearance": 6.0, "dash_spacing": 1.5}, 1),
    # Path-X defaults: clearance 12 px, dash gaps 6 px, so a 3-px bridge does the same.
    (128, {}, 3),
])
def test_pathfinder_generated_labels_match_image_connectivity(tmp_path, size, options, bridge):
    out = pf.generate_pathfinder(tmp_path, n=16, seed=2, size=size, **options)
    record = pf.read_record(out)
    answers = []
    for entry in record["images"]:
        pixels = np.asarray(Image.open(os.path.join(out, entry["path"])))
        answers.append(connected_by_image(pixels, entry["markers"], bridge=bridge))
    assert answers == [e["label"] for e in record["images"]]
    assert sorted(answers) == [0] * 8 + [1] * 8


def test_pathfinder_generator_knobs_and_errors(tmp_path):
    out = pf.generate_pathfinder(tmp_path, n=2, seed=0, size=32, path_length=5, distractors=0,
                                 dash_spacing=2.0, subdir="easy")
    record = pf.read_record(out)
    assert record["path_length"] == 5 and record["dash_spacing"] == 2.0
    assert [e["num_contours"] for e in record["images"]] == [2, 2]
    with pytest.raises(DataError, match="cannot fit"):
        pf.generate_pathfinder(tmp_path / "x", n=1, size=16, path_length=40)
    with pytest.raises(DataError, match="dash_spacing must be positive"):
        pf.generate_pathfinder(tmp_path / "y", n=1, dash_spacing=0)


# ---- sequential images ------------------------------------------------------------------------

def test_image_sequence_grey_and_raw_encodings(tmp_path):
    x_train = np.zeros((4, 2, 3, 3), np.uint8)
    x_train[0, 0, 0] = [255, 0, 0]          # grey round(0.2989·255) = 76 -> level 4
    x_train[0, 1, 2] = [255, 255, 255]      # grey 255 -> level 15
    x_train[1, 0, 1] = [16, 16, 16]         # grey 16 -> level 1
    y_train = np.array([[0], [1], [2], [1]])  # Keras shape (N, 1)
    x_test, y_test = x_train[:2].copy(), np.array([2, 0])
    path = tmp_path / "scifar.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             x_valid=x_test, y_valid=y_test)
    grey = ImageSequenceTask(tmp_path)
    assert (grey.num_input, grey.num_output, grey.seq_len) == (16, 3, 6)
    x = grey.inputs("train", np.array([0, 1]))
    assert x.shape == (2, 6, 16)
    assert np.argmax(x[0], axis=1).tolist() == [4, 0, 0, 0, 0, 15]
    assert np.argmax(x[1], axis=1).tolist() == [0, 1, 0, 0, 0, 0]
    assert grey.labels["train"].tolist() == [0, 1, 2, 1]
    raw = ImageSequenceTask(path, encoding="raw")
    xr = next(raw.batches("test", 2)).X
    assert raw.num_input == 3 and xr.shape == (2, 6, 3)
    np.testing.assert_allclose(xr[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(xr[1, 1], [16 / 255] * 3, rtol=1e-6)


def test_image_sequence_npy_directory_and_holdout(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x_train.npy", rng.integers(0, 256, (20, 4, 4), dtype=np.uint8))
    np.save(tmp_path / "y_train.npy", np.arange(20) % 2)
    np.save(tmp_path / "x_test.npy", rng.integers(0, 256, (3, 4, 4), dtype=np.uint8))
    np.save(tmp_path / "y_test.npy", np.array([0, 1, 1]))
    task = ImageSequenceTask(tmp_path, valid_fraction=0.25, levels=4)
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [15, 5, 3]
    assert task.num_input == 4 and task.seq_len == 16


def test_image_sequence_rejects_bad_arrays(tmp_path):
    np.savez(tmp_path / "f.npz", x_train=np.zeros((2, 4, 4), np.float32), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, int))
    with pytest.raises(DataError, match="x_train must be uint8"):
        ImageSequenceTask(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(3, int))
    with pytest.raises(DataError, match="missing array 'x_test'"):
        ImageSequenceTask(tmp_path / "g.npz")
    with pytest.raises(DataError, match=r"scifar.npz.*cifar"):
        ImageSequenceTask(tmp_path / "nothing-here")
