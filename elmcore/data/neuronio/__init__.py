"""NeuronIO (Beniaguev et al.): everything the task needs, in one package.

- ``pickle_io``: the restricted unpickler (no code, no foreign memory) and the Python 2 style writer;
- ``files``: decoding one file into sparse input events and dense targets;
- ``task``: the streaming :class:`NeuronIOTask` (split discovery, cache, prefetching);
- ``soma``, ``loss``, ``evaluation``: the release's soma targets, training loss,
  windowed evaluation and output head, reached by generic code only through the task's hooks;
- ``surrogate``: the packaged teacher and the offline surrogate generator.

File format (docs/spec.md, dataset file formats): pickles named ``*sim__*.p``, written by Python 2 with
protocol 2, each holding ``{'Params': {...}, 'Results': {'listOfSingleSimulationDicts':
[...]}}`` with, per simulation, the input spike times per dendritic segment
(``exInputSpikeTimes`` / ``inhInputSpikeTimes``: ``{segment: [ms, ...]}``), the
output spike times (``outputSpikeTimes``, ms) and the soma voltage sampled once per
ms (``somaVoltageLowRes``, mV). The published set has 128 simulations × 6000 ms per
file and 639 segments.

Conventions, as in the release's loader (``neuronio_data_utils.parse_sim_experiment_file``):

- Input: 2·segments rows, excitatory first, then inhibitory. An input spike at time
  ``t`` ms sets bin ``int(t)`` (the published times are integer ms, so this is the
  release's ``matrix[seg, t] = 1``); a segment spiking twice in one bin still reads 1.
  The model sees ``+1`` for excitatory and ``-1`` for inhibitory spikes
  (docs/spec.md §5 ``synapse_types``), 0 elsewhere.
- Output spike at time ``t`` ms -> bin ``int(t - 0.5)`` (truncation, as the release).
- Soma targets: training ``(min(v, -55) - (-67.7)) * 0.1``; evaluation
  ``min(v, -55) - (-67.7)`` in mV.

Memory: a decoded file keeps its input as sparse events (the inputs spiking in each
ms, int16, plus a per-simulation index by time), never as a dense
(sims, 6000, 1278) array (3.9 GB per published file); windows are densified on demand.
"""

from elmcore.data.neuronio.evaluation import align_soma, evaluate_neuronio, neuronio_head, neuronio_predict, window_plan
from elmcore.data.neuronio.files import (DATA_SOURCE, FILE_PATTERN, NUM_INPUT, NUM_SEGMENTS,
                                         RELEASE_IGNORE_TIME_FROM_START, SIM_DURATION_MS, SIMS_PER_FILE, NeuronIOFile,
                                         input_signs, read_neuronio_file)
from elmcore.data.neuronio.loss import neuronio_loss
from elmcore.data.neuronio.pickle_io import load_neuronio_pickle, write_neuronio_file
from elmcore.data.neuronio.soma import (SOMA_BIAS_MV, SOMA_CAP_MV, SOMA_SCALE, prepare_soma, soma_eval_target,
                                        soma_training_target)
from elmcore.data.neuronio.surrogate import (generate_neuronio_surrogate, load_teacher, surrogate_input,
                                             surrogate_params, teacher_path)
from elmcore.data.neuronio.task import NeuronIOTask, discover_splits

__all__ = [
    "DATA_SOURCE", "FILE_PATTERN", "NUM_INPUT", "NUM_SEGMENTS", "RELEASE_IGNORE_TIME_FROM_START",
    "SIM_DURATION_MS", "SIMS_PER_FILE", "SOMA_BIAS_MV", "SOMA_CAP_MV", "SOMA_SCALE",
    "NeuronIOFile", "NeuronIOTask", "align_soma", "discover_splits", "evaluate_neuronio",
    "generate_neuronio_surrogate", "input_signs", "load_neuronio_pickle", "load_teacher", "neuronio_head",
    "neuronio_loss", "neuronio_predict", "prepare_soma", "read_neuronio_file", "soma_eval_target",
    "soma_training_target", "surrogate_input", "surrogate_params", "teacher_path", "window_plan",
    "write_neuronio_file",
]
