"""Task names → how to read (and, for some, generate) each data set.

``get_task(name, data_dir, seed, **options)`` returns a :class:`~elmcore.data.base.Task`;
``generate(name, out_dir, n, seed, **options)`` writes a data set that
``get_task(name, out_dir)`` then reads. Readers are imported only when their
task is asked for, so a missing optional dependency of one data set (h5py for
SHD) never breaks the others.

What ``n`` counts when generating: examples in all splits together (ListOps,
adding, delayed recall: split 80 / 10 / 10; Pathfinder: images, split by the
reader), NeuronIO surrogate files (``sims_per_file`` simulations each), or the
characters of a ``text`` corpus (split 90 / 5 / 5 by the reader).
"""

import dataclasses
import glob
import importlib
import inspect
import json
import math
import os
import sys
import typing
from typing import Optional

from elmcore.errors import DataError, ELMError, did_you_mean
from elmcore.data.base import MANIFEST, SPLITS, OutputHead, Task
from elmcore.data.walk import find_files
from elmcore.engine.fields import NETWORK_VERSION

LRA_SOURCE = ("the LRA release tarball lra_release.gz from "
              "https://github.com/google-research/long-range-arena")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    reader: tuple                     # (module, class or function) building the task
    reader_options: dict              # fixed keyword arguments of the reader
    files: tuple                      # what a data directory must hold (glob patterns)
    source: str                       # where to get the data
    generator: Optional[tuple] = None  # (module, function) writing the data set
    generator_options: dict = dataclasses.field(default_factory=dict)
    default_n: int = 1000
    count_option: str = "n"           # the generator's name for ``n``
    in_memory: bool = False           # buildable without any data_dir (generated on the fly)
    own_search: bool = False          # the reader searches sub-folders / files itself and names them
    # The task's default runs, one per model family at most (:class:`DefaultRun`): ``elm train --task
    # NAME`` starts from the one for the family the run asks for (see :func:`default_run`).
    default_runs: tuple = ()
    heads: tuple = ()                 # OutputHeads ``elm predict --head`` offers for this task's models


# The model families a default run can be for: the single neuron (elm_v1, branch_elm_v2) and the ELM Network.
FAMILIES = ("neuron", "network")
# A run that names no model version is a single-neuron run (ELMConfig's default version is elm_v1).
DEFAULT_FAMILY = "neuron"


def model_family(version):
    """The family of a model ``version``: "network" for elm_network, "neuron" for any other (or none)."""
    return "network" if version == NETWORK_VERSION else "neuron"


@dataclasses.dataclass(frozen=True)
class DefaultRun:
    """Training settings a task's run of one model family starts from.

    ``settings`` are TrainSettings keys; flags and run files override them field by field
    and TrainSettings' defaults fill the rest. The ``task_options`` of a task generated in
    memory (adding, delayed recall) apply only without a data_dir, since a data set read
    from a file carries its own sizes; a reader's options (a text window) always apply.
    ``reaches`` says what the run was measured to reach (metric, steps, time, machine),
    or "not measured".
    """
    family: str
    settings: dict
    reaches: str = "not measured"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"a default run's family must be one of {FAMILIES}, got {self.family!r}")
        version = self.settings.get("model", {}).get("version")
        if version is not None and model_family(version) != self.family:
            raise ValueError(f"a default {self.family} run may not set version {version!r}")


def _spec(name, summary, reader, files, source, reader_options=None, generator=None,
          generator_options=None, default_n=1000, count_option="n", in_memory=False, own_search=False,
          default_runs=(), heads=()):
    families = [run.family for run in default_runs]
    if len(set(families)) != len(families):
        raise ValueError(f"task {name}: one default run per model family")
    return TaskSpec(name, summary, reader, dict(reader_options or {}), tuple(files), source, generator,
                    dict(generator_options or {}), default_n, count_option, in_memory, own_search,
                    tuple(default_runs), tuple(heads))


def _network_run(model, reaches="not measured", **settings):
    """A task's default ELM Network run: ``model`` fields over the network's defaults, training ``settings``."""
    return DefaultRun("network", {**settings, "model": {"version": NETWORK_VERSION, **model}}, reaches)


# What the unmeasured network runs are based on: the learning rates measured on the generated
# tasks (text, adding, delayed recall), where 1e-3 proved far too low for a network.
BY_ANALOGY = "not measured (the learning rate follows the measured generated tasks)"


def _generated_hint(name):
    return f"run `elm data generate {name} --out DIR`"


TASKS = {spec.name: spec for spec in (
    _spec("neuronio", "NeuronIO L5PC input/output (1278 inputs, spike + soma)",
          ("elmcore.data.neuronio", "NeuronIOTask"), ("**/*sim__*.p",),
          "the NeuronIO data of Beniaguev, Segev & London (Neuron 2021) on Kaggle "
          "(kaggle.com/selfishgene/single-neurons-as-deep-nets-nmda-train-data, "
          f"...-nmda-test-data), or {_generated_hint('neuronio')} for a teacher-labelled surrogate",
          # Three files at least, so the reader's file split gives train, valid and test one each.
          generator=("elmcore.data.neuronio", "generate_neuronio_surrogate"), default_n=3,
          count_option="n_files",
          # A network reads the spikes through its own synapses: not the release's 45 x 100 routed ones.
          default_runs=[_network_run({"num_neurons": 64, "num_branch": 8, "num_synapse_per_branch": 16},
                                     BY_ANALOGY, lr=5e-3)],
          heads=[OutputHead("neuronio", "sigmoid spike probability and soma in mV (bias-subtracted), as the "
                            "release's eval head", ("elmcore.data.neuronio.evaluation", "neuronio_head"),
                            min_outputs=2)]),
    _spec("shd", "Spiking Heidelberg Digits (700 inputs, 20 classes)",
          ("elmcore.data.shd", "SHDTask"), ("shd_train.h5", "shd_test.h5"),
          "https://zenkelab.org/datasets/ (Cramer et al., IEEE TNNLS 2020)",
          reader_options={"adding": False},
          default_runs=[_network_run({"num_neurons": 128, "num_memory": 8, "num_synapse_per_branch": 8},
                                     BY_ANALOGY, lr=1e-2, epochs=20)]),
    _spec("shd-adding", "SHD-Adding: two digits in a row, their sum (19 classes)",
          ("elmcore.data.shd", "SHDTask"), ("shd_train.h5", "shd_test.h5"),
          "https://zenkelab.org/datasets/ (Cramer et al., IEEE TNNLS 2020)",
          reader_options={"adding": True},
          default_runs=[_network_run({"num_neurons": 128, "num_memory": 8, "num_synapse_per_branch": 8},
                                     BY_ANALOGY, lr=1e-2, epochs=20)]),
    _spec("listops", "LRA ListOps (16 one-hot tokens, 10 classes)",
          ("elmcore.data.listops", "ListOpsTask"),
          ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"),
          f"{LRA_SOURCE} (folder lra_release/listops-1000), or {_generated_hint('listops')}",
          generator=("elmcore.data.listops", "generate_listops"),
          default_runs=[_network_run({"num_neurons": 64}, BY_ANALOGY, lr=1e-2)]),
    _spec("pathfinder", "LRA Pathfinder 32×32 (16 grey levels one-hot, 1024 steps, 2 classes)",
          ("elmcore.data.pathfinder", "PathfinderTask"), ("metadata/*.npy",),
          f"{LRA_SOURCE} (folder lra_release/pathfinder32), or {_generated_hint('pathfinder')}",
          reader_options={"resolution": 32, "task": "pathfinder"}, own_search=True,
          generator=("elmcore.data.pathfinder", "generate_pathfinder"),
          default_runs=[_network_run({"num_neurons": 64}, BY_ANALOGY, lr=1e-2)]),
    _spec("pathfinder64", "Pathfinder 64×64 (16 grey levels one-hot, 4096 steps, 2 classes)",
          ("elmcore.data.pathfinder", "PathfinderTask"), ("metadata/*.npy",),
          f"{_generated_hint('pathfinder64')} (LRA ships no 64×64 set)",
          reader_options={"resolution": 64, "task": "pathfinder64"}, own_search=True,
          generator=("elmcore.data.pathfinder", "generate_pathfinder"),
          generator_options={"size": 64},
          default_runs=[_network_run({"num_neurons": 64}, BY_ANALOGY, lr=1e-2)]),
    _spec("pathx", "LRA Path-X 128×128 (8 grey levels one-hot, 16384 steps, 2 classes)",
          ("elmcore.data.pathfinder", "PathfinderTask"), ("metadata/*.npy",),
          f"{LRA_SOURCE} (folder lra_release/pathfinder128), or {_generated_hint('pathx')}",
          reader_options={"resolution": 128, "task": "pathx"}, own_search=True,
          generator=("elmcore.data.pathfinder", "generate_pathfinder"),
          generator_options={"size": 128},
          default_runs=[_network_run({"num_neurons": 64}, BY_ANALOGY, lr=1e-2)]),
    _spec("scifar", "sequential CIFAR-10 / LRA Image (one pixel per step)",
          ("elmcore.data.images", "ImageSequenceTask"), ("scifar.npz|cifar10.npz|x_train.npy",),
          "CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html) saved as scifar.npz with uint8 "
          "x_train (N,32,32,3), y_train, x_test, y_test", own_search=True,
          default_runs=[_network_run({"num_neurons": 64}, BY_ANALOGY, lr=1e-2)]),
    _spec("adding", "adding problem (2 inputs, regression of the last step)",
          ("elmcore.data.synthetic", "load_synthetic"), ("adding.npz",), _generated_hint("adding"),
          generator=("elmcore.data.synthetic", "generate_synthetic"),
          generator_options={"name": "adding"}, in_memory=True,
          # `elm train` with no task runs the neuron run.
          default_runs=[
              DefaultRun("neuron", {"task_options": {"length": 200, "n": 10000},
                                    "model": {"version": "branch_elm_v2", "num_memory": 30,
                                              "memory_tau_max": 500.0},
                                    "epochs": 20, "lr": 5e-3},
                         reaches="valid mse 0.0086 after 15 of its 20 epochs, test mse 0.0027 at the end "
                                 "(5,000 steps), 89 s on an idle 2-core CPU"),
              # At length 200 a 16-neuron network sat on the 0.16 plateau for its first 500 steps at every
              # lr from 1e-3 to 3e-2; at length 100 it leaves it in the third epoch. At length 50, lr 1e-2
              # reached valid mse 0.0014 in 5 epochs, where 3e-3 reached 0.032 and 3e-2 0.13.
              _network_run({"num_neurons": 16},
                           "valid mse 0.0016 after 8 epochs (2,000 steps), test mse 0.0011, 230 s on a busy "
                           "2-core CPU", task_options={"length": 100, "n": 10000}, epochs=8, lr=1e-2),
          ]),
    _spec("delayed-recall", "delayed recall of a cue token (K+1 inputs, K classes)",
          ("elmcore.data.synthetic", "load_synthetic"), ("delayed-recall.npz",),
          _generated_hint("delayed-recall"),
          generator=("elmcore.data.synthetic", "generate_synthetic"),
          generator_options={"name": "delayed-recall"}, in_memory=True,
          # Every lr from 1e-3 to 3e-2 reached accuracy 1.0 in the first epoch; the valid loss after 3
          # epochs was 7.1e-4 at 1e-3, 1.7e-4 at 3e-3, 7.7e-5 at 1e-2 and 2.3e-5 at 3e-2.
          default_runs=[_network_run({"num_neurons": 16},
                                     "valid accuracy 1.0 after the first of 3 epochs (250 of 750 steps), 63 s "
                                     "in all on a busy 2-core CPU", task_options={"n": 10000}, epochs=3,
                                     lr=1e-2)]),
    _spec("enwik8", "enwik8 character-level language modelling (256 one-hot bytes, next byte at every step)",
          ("elmcore.data.text", "Enwik8Task"), ("enwik8|enwik8.zip",),
          "http://mattmahoney.net/dc/enwik8.zip (the standard 100,000,000-byte file; the zip or its "
          "unpacked enwik8)", own_search=True,
          default_runs=[_network_run({"num_neurons": 64}, "not measured (the text task's network run: "
                                     "its learning rate, shape and window)", task_options={"length": 64},
                                     lr=2e-2)]),
    _spec("text", "character-level language modelling on any local text or byte file",
          ("elmcore.data.text", "TextTask"), ("one text or byte file",),
          f"any text file (pass the file or a folder holding only it), or {_generated_hint('text')}",
          own_search=True, generator=("elmcore.data.text", "generate_text"), default_n=100_000,
          count_option="num_chars",
          # On the generated corpus (100,000 characters, entropy rate ~0.2 bits per character) the 64-neuron
          # network reached, after 440 steps, valid bpc 2.73 at lr 1e-3, 0.67 at 3e-3, 0.28 at 1e-2, 0.26
          # at 2e-2 and 0.25 at 5e-2; 2e-2 also trains well on English text, where 1e-3 barely learns.
          default_runs=[_network_run({"num_neurons": 64},
                                     "valid 0.26 bits per character after 10 epochs (440 steps) on `elm data "
                                     "generate text` (unigram entropy 3.53), 72 s on a busy 2-core CPU",
                                     task_options={"length": 64}, epochs=10, lr=2e-2)]),
)}
GENERATABLE = tuple(name for name, spec in TASKS.items() if spec.generator)
# Pathfinder's image sizes, each a task of its own.
PATHFINDER_SIZES = {32: "pathfinder", 64: "pathfinder64", 128: "pathx"}
# make_synthetic / generate_synthetic serve both in-memory tasks; these of their options mean nothing to one.
NOT_OPTIONS_OF = {"adding": ("num_tokens",)}
# What `elm train` trains when no task is named: the same experiment as `elm train --task adding`.
DEFAULT_TASK = "adding"


def output_heads():
    """{name: OutputHead} of every head the tasks declare (``elm predict --head``)."""
    return {head.name: head for spec in TASKS.values() for head in spec.heads}


def load_head(head):
    """The function an :class:`OutputHead` names (imported only when asked for)."""
    return _load(head.function)


def task_spec(name):
    """The :class:`TaskSpec` of ``name`` (``_`` and ``-`` are interchangeable)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ELMError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


def _load(target):
    module, attr = target
    return getattr(importlib.import_module(module), attr)


# Ranges of task options, checked here once for every reader and generator that takes an option of
# that name. Integer options are otherwise >= 0; these counts and sizes must be >= 1.
POSITIVE_OPTIONS = frozenset({"n", "n_files", "num_chars", "length", "num_tokens", "window", "bin_size",
                              "sims_per_file", "duration_ms", "size", "levels", "per_folder"})
# Counts and sizes beyond a 64-bit integer describe no data set.
MAX_OPTION_INT = 2 ** 63 - 1
# Shares of the examples held out: [0, 1).
FRACTION_OPTIONS = frozenset({"valid_fraction", "test_fraction"})


def _option_kind(parameter):
    """(type an option must have, whether null is allowed), from its annotation or else its default."""
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty:
        args = typing.get_args(annotation)
        if args:
            base = next((a for a in args if a is not type(None)), None)
            return base, type(None) in args
        return annotation, False
    default = parameter.default
    if default is None or default is inspect.Parameter.empty:
        return None, True
    return type(default), False


def check_option(what, name, value, parameter):
    """Raise an ELMError naming ``name`` unless ``value`` has the type and range the option takes."""
    kind, nullable = _option_kind(parameter)
    if value is None:
        if nullable:
            return
        raise ELMError(f"{what}: option {name} may not be null")
    if isinstance(value, (list, dict, tuple, set)):
        raise ELMError(f"{what}: option {name} takes a single value, got {value!r:.60}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ELMError(f"{what}: option {name} must be true or false, got {value!r:.60}")
        return
    untyped = kind is None and not isinstance(value, bool)
    if kind is int or (untyped and isinstance(value, int)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ELMError(f"{what}: option {name} must be an integer, got {value!r:.60}")
        minimum = 1 if name in POSITIVE_OPTIONS else 0
        if value < minimum:
            raise ELMError(f"{what}: option {name} must be >= {minimum}, got {value}")
        if value > MAX_OPTION_INT:
            shown = value if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
            raise ELMError(f"{what}: option {name} must be <= {MAX_OPTION_INT}, got {shown}")
        return
    if kind is float or (untyped and isinstance(value, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > sys.float_info.max \
                or not math.isfinite(value):
            raise ELMError(f"{what}: option {name} must be a finite number, got {value!r:.60}")
        if name in FRACTION_OPTIONS and not 0 <= value < 1:
            raise ELMError(f"{what}: option {name} must be in [0, 1), got {value}")
        if value < 0:
            raise ELMError(f"{what}: option {name} must be >= 0, got {value}")
        return
    if kind is str and not isinstance(value, str):
        raise ELMError(f"{what}: option {name} must be a string, got {value!r:.60}")


def _call(function, what, *args, **options):
    """Call ``function`` after checking every option: one of its parameters, of the right type and range."""
    params = inspect.signature(function).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = list(params)[len(args):]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ELMError(f"{what}: unknown option(s) {', '.join(unknown)}{did_you_mean(unknown[0], accepted)} "
                           f"(accepted: {', '.join(accepted)})")
    for name, value in options.items():
        if name in params:
            check_option(what, name, value, params[name])
    return function(*args, **options)


def _check_synthetic_size(name, function, options):
    """Generated in memory: refuse, before allocating, sizes whose float32 inputs cannot fit."""
    from elmcore.engine.memory import check_memory
    params = inspect.signature(function).parameters

    def option(key):
        value = options.get(key, params[key].default)
        return value if isinstance(value, int) and not isinstance(value, bool) else 1

    channels = 2 if name == "adding" else option("num_tokens") + 1
    check_memory(option("n") * option("length") * channels * 4,
                 f"{name} with n={option('n')}, length={option('length')}")


def _refuse_foreign_options(name, function, options):
    """Options of a shared generator that task ``name`` does not have are refused, not silently ignored."""
    foreign = sorted(set(options) & set(NOT_OPTIONS_OF.get(name, ())))
    if foreign:
        accepted = [p for p in list(inspect.signature(function).parameters)[1:]
                    if p not in NOT_OPTIONS_OF[name] and p not in ("name", "seed", "progress")]
        raise ELMError(f"{name}: unknown option(s) {', '.join(foreign)} (accepted: {', '.join(accepted)})")


def _matches(data_dir, pattern):
    """Whether ``data_dir`` holds a file for ``pattern`` (alternatives separated by ``|``)."""
    for alternative in pattern.split("|"):
        if alternative.startswith("**/"):
            if find_files(data_dir, alternative[3:], first_only=True):
                return True
        elif glob.glob(os.path.join(glob.escape(data_dir), alternative)):
            return True
    return False


def data_files(name, data_dir):
    """The files of task ``name`` that ``data_dir`` holds (what a command reading it must not write over)."""
    if data_dir is None:
        return []
    data_dir = os.fspath(data_dir)
    if os.path.isfile(data_dir):
        return [data_dir]
    spec = task_spec(name)
    if spec.name == "text" and os.path.isdir(data_dir):  # the reader takes the one file the directory holds
        return [os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir))
                if not f.startswith(".") and os.path.isfile(os.path.join(data_dir, f))]
    found = []
    for pattern in spec.files:
        for alternative in pattern.split("|"):
            found += glob.glob(os.path.join(glob.escape(data_dir), alternative), recursive=True)
    return found


def check_data_dir(spec, data_dir):
    """Raise a DataError naming the files looked for, the directory and where to get them."""
    if data_dir is None:
        raise DataError(f"task '{spec.name}' reads data files ({', '.join(spec.files)}): pass a data "
                        f"directory. Get them from {spec.source}")
    data_dir = os.fspath(data_dir)
    if spec.own_search and os.path.exists(data_dir):
        return
    if os.path.isfile(data_dir):
        raise DataError(f"{spec.name}: {data_dir} is a file; the task reads a directory holding "
                        f"{', '.join(spec.files)}")
    if not os.path.isdir(data_dir):
        raise DataError(f"{spec.name}: data directory {data_dir} does not exist (it should hold "
                        f"{', '.join(spec.files)}). Get the data from {spec.source}")
    missing = [p for p in spec.files if not _matches(data_dir, p)]
    if missing:
        raise DataError(f"{spec.name}: {', '.join(missing)} not found in {data_dir}. Get the data "
                        f"from {spec.source}")


def get_task(name, data_dir=None, seed=0, **options) -> Task:
    """Build task ``name`` from ``data_dir`` (see :data:`TASKS`).

    ``seed`` drives whatever the reader draws (splits, windows, pairs);
    ``options`` go to the reader (e.g. ``max_length`` for ListOps, ``levels``
    for Pathfinder, ``bin_size`` for SHD). ``adding`` and ``delayed-recall``
    without a ``data_dir`` are generated in memory from ``seed`` (options
    ``n``, ``length``, ``num_tokens``); with one they are read from
    ``<data_dir>/<name>.npz`` (or ``data_dir`` itself when it is that file).
    """
    spec = task_spec(name)
    if spec.in_memory:
        from elmcore.data.synthetic import load_synthetic, make_synthetic
        if data_dir is None:
            _refuse_foreign_options(spec.name, make_synthetic, options)
            _check_synthetic_size(spec.name, make_synthetic, options)
            return _call(make_synthetic, spec.name, spec.name, seed=seed, **options)
        if options:
            raise ELMError(f"{spec.name}: options {', '.join(sorted(options))} apply only when "
                           f"generating in memory (no data_dir)")
        path = os.fspath(data_dir)
        if os.path.isdir(path):
            path = os.path.join(path, spec.files[0])
        if not os.path.isfile(path):
            raise DataError(f"{spec.name}: {spec.files[0]} not found in {os.fspath(data_dir)}. "
                            f"Create it: {spec.source}")
        return load_synthetic(path, expected=spec.name)
    check_data_dir(spec, data_dir)
    reader = _load(spec.reader)
    kwargs = {**spec.reader_options, **options}
    if "seed" in inspect.signature(reader).parameters:
        kwargs["seed"] = seed
    return _call(reader, spec.name, os.fspath(data_dir), **kwargs)


def generate(name, out_dir, n=None, seed=0, progress=False, **options):
    """Write a data set of task ``name`` into ``out_dir``; return the directory to read it from.

    Options go to the generator (ListOps: ``min_length``, ``max_length``,
    ``max_depth``, ``max_args``, ``balanced``; Pathfinder: ``path_length``,
    ``distractors``, ``dash_spacing``, …; adding / delayed recall: ``length``,
    ``num_tokens``; NeuronIO: ``sims_per_file``, ``duration_ms``).
    """
    spec = task_spec(name)
    if spec.generator is None:
        raise ELMError(f"task '{spec.name}' cannot be generated (generatable: {', '.join(GENERATABLE)}); "
                       f"get its data from {spec.source}")
    n = spec.default_n if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_OPTION_INT:
        raise ELMError(f"n must be an integer in [1, {MAX_OPTION_INT}], got "
                       f"{n if not isinstance(n, int) or n.bit_length() <= 128 else 'a huge integer'}")
    for field, value in spec.generator_options.items():
        if field in options and options[field] != value:
            hint = f"; use task 'pathfinder' with {field}={options[field]}" if field == "size" else ""
            raise ELMError(f"task '{spec.name}' has {field}={value}{hint}")
    out_dir = os.fspath(out_dir)
    generator = _load(spec.generator)
    kwargs = {**spec.generator_options, **options, spec.count_option: n, "seed": seed}
    if "progress" in inspect.signature(generator).parameters:
        kwargs["progress"] = progress
    if spec.in_memory:
        _refuse_foreign_options(spec.name, generator, options)
        _check_synthetic_size(spec.name, generator, kwargs)
    _call(generator, spec.name, out_dir, **kwargs)
    write_manifest(spec, out_dir, n, seed, options)
    return out_dir


def write_manifest(spec, out_dir, n, seed, options):
    """``out_dir/elmcore_data.json``: the task, how it was generated and, where its reader reads it with
    the default options, what the reader counts in each split."""
    from elmcore.storage.fileio import atomic_write_text
    name = spec.name
    if name in PATHFINDER_SIZES.values() and "size" in options:  # each image size is a task of its own
        name = PATHFINDER_SIZES.get(options["size"], name)
    manifest = {"task": name, "generated_by": f"elm data generate {spec.name}", "seed": seed,
                spec.count_option: n, "options": options}
    try:
        task = get_task(name, out_dir, seed=seed)
        manifest["counts"] = {split: {"count": task.num_examples(split), "unit": task.count_unit(split)}
                              for split in SPLITS}
    except ELMError as e:  # e.g. a corpus shorter than the default window: the reader says so when used
        manifest["counts"] = f"not read with the default options: {e}"
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def read_manifest(data_dir):
    """The manifest ``elm data generate`` left in ``data_dir``, or None (absent, unreadable or not one)."""
    try:
        with open(os.path.join(os.fspath(data_dir), MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("task") in TASKS else None


def detect_task(data_dir):
    """Guess the task whose files ``data_dir`` holds (for ``elm data info``)."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist (name the task with --task to be "
                        f"told where to get its data)")
    manifest = read_manifest(data_dir)
    if manifest is not None:
        return manifest["task"]
    for name in ("listops", "shd", "adding", "delayed-recall", "scifar", "enwik8"):
        if all(_matches(data_dir, p) for p in TASKS[name].files):
            return name
    from elmcore.data.pathfinder import find_pathfinder_dir, image_resolution
    try:
        dataset = find_pathfinder_dir(data_dir, 32)
    except DataError:
        dataset = None
    if dataset is not None:
        return PATHFINDER_SIZES.get(image_resolution(dataset), "pathfinder")
    if _matches(data_dir, TASKS["neuronio"].files[0]):
        return "neuronio"
    looked = "; ".join(f"{n}: {', '.join(s.files)}" for n, s in TASKS.items()
                       if n not in ("shd-adding", "text"))
    raise DataError(f"cannot tell which task the files in {data_dir} belong to (looked for {looked}); "
                    f"name it with --task (--task text reads any text or byte file)")


def find_default_run(name, family=DEFAULT_FAMILY):
    """Task ``name``'s :class:`DefaultRun` for model ``family``, or None when it has none."""
    if family not in FAMILIES:
        raise ELMError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    return next((run for run in task_spec(name).default_runs if run.family == family), None)


def default_run(name, data_dir=None, family=DEFAULT_FAMILY):
    """The training settings task ``name``'s runs of model ``family`` start from (none: only the task).

    ``elm train --task NAME`` is the ``DEFAULT_FAMILY`` run; a run that names
    ``version = "elm_network"`` starts from the network run instead, never from the
    single neuron's settings.
    """
    spec = task_spec(name)
    found = find_default_run(spec.name, family)
    run = {key: dict(value) if isinstance(value, dict) else value
           for key, value in (found.settings if found else {}).items()}
    if data_dir is not None and spec.in_memory:
        run.pop("task_options", None)
    return {**run, "task": spec.name}


def task_options(name):
    """{option: default} a task accepts as ``--task-option`` (its reader's keyword arguments).

    Options the registry fixes for the task (``reader_options``) and the data
    directory / seed, which have their own flags, are left out.
    """
    spec = task_spec(name)
    if spec.in_memory:
        from elmcore.data.synthetic import make_synthetic
        function, skip = make_synthetic, {"name", "seed", *NOT_OPTIONS_OF.get(spec.name, ())}
    else:
        function, skip = _load(spec.reader), {"data_dir", "path", "seed", *spec.reader_options}
    out = {}
    for option, param in inspect.signature(function).parameters.items():
        if option in skip or option == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        out[option] = None if param.default is param.empty else param.default
    return out
