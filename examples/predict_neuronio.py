"""Prepare your own NeuronIO-style input for a trained model and predict spikes and soma voltage.

    python examples/predict_neuronio.py --out /tmp/nio_predict

The release's NeuronIO models read 1278 inputs per 1 ms step: the 639 excitatory
dendritic segments first, then the 639 inhibitory ones. An excitatory spike is +1,
an inhibitory spike is **−1**, no spike is 0 (docs/spec.md §5). The sign is the only
thing that makes an input inhibitory (synaptic weights are ≥ 0), and ``elm predict``
applies the model to the array exactly as given: a file of 0/1 spikes gives wrong
answers without any error.

The same input through the command line:

    elm convert tests/data/reference_models/best_elm_neuron/neuronio_best_model_state.pt -o best.npz
    elm predict best.npz --input X.npy --output Y.npy --head neuronio

``--head neuronio`` returns, per ms, the spike probability and the soma voltage in mV
relative to −67.7 mV (the release's evaluation output).
"""

import argparse
import os

import numpy as np

from elmcore import ELM
from elmcore.training.predict import predict_array
from elmcore.verification.torch_checkpoint import load_release_model

SEGMENTS = 639
NUM_INPUT = 2 * SEGMENTS
HERE = os.path.dirname(os.path.abspath(__file__))
RELEASE_MODEL = os.path.join(HERE, "..", "tests", "data", "reference_models", "best_elm_neuron",
                             "neuronio_best_model_state.pt")


def neuronio_input(excitatory, inhibitory, duration_ms):
    """(duration_ms, 1278) int8 input from spike times.

    excitatory, inhibitory: {segment (0..638): [spike times in ms, ...]}, as in the
    NeuronIO files' ``exInputSpikeTimes`` / ``inhInputSpikeTimes``. A spike at t ms
    lands in bin int(t); int8 keeps the file small and elmcore reads it directly.
    """
    X = np.zeros((duration_ms, NUM_INPUT), np.int8)
    for segment, times in excitatory.items():
        X[np.asarray(times, dtype=np.int64), segment] = 1
    for segment, times in inhibitory.items():
        X[np.asarray(times, dtype=np.int64), SEGMENTS + segment] = -1
    return X


def random_spike_times(rng, rate_hz, duration_ms):
    """{segment: sorted spike times} of independent Poisson inputs."""
    p = rate_hz / 1000.0
    spikes = rng.random((SEGMENTS, duration_ms)) < p
    return {s: np.nonzero(spikes[s])[0].tolist() for s in range(SEGMENTS) if spikes[s].any()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for X.npy")
    parser.add_argument("--duration", type=int, default=1000, help="ms of input")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    config, params = load_release_model(RELEASE_MODEL)
    model = ELM(config, params=params, dtype="float32")

    rng = np.random.default_rng(0)
    excitatory = random_spike_times(rng, rate_hz=6.0, duration_ms=args.duration)
    inhibitory = random_spike_times(rng, rate_hz=6.0, duration_ms=args.duration)
    X = neuronio_input(excitatory, inhibitory, args.duration)
    np.save(os.path.join(args.out, "X.npy"), X)      # input for `elm predict`

    # What the sign does: the same input with the inhibitory spikes dropped, and with
    # them wrongly given as +1 (a 0/1 spike matrix). One batch of three sequences.
    variants = {"inhibition as -1": X,
                "without inhibition": np.where(X > 0, X, 0).astype(np.int8),
                "inhibition wrongly as +1": np.abs(X)}
    Y = predict_array(model, np.stack(list(variants.values())), head="neuronio")  # (3, T, 2)

    # The state starts at zero; as the release's evaluation does, skip the first 500 ms.
    settled = slice(min(500, args.duration // 2), None)
    print(f"{args.duration} ms, {int((X > 0).sum())} excitatory and {int((X < 0).sum())} inhibitory "
          f"input spikes; after {settled.start} ms:")
    summary = {}
    for name, y in zip(variants, Y):
        soma, expected_spikes = float(y[settled, 1].mean()), float(y[settled, 0].sum())
        summary[name] = {"soma_mV": soma, "expected_spikes": expected_spikes}
        print(f"  {name:25s} mean soma {soma:+6.2f} mV vs -67.7 mV, expected output spikes "
              f"{expected_spikes:.2f}")
    return {"X": X, "Y": Y[0], "summary": summary}


if __name__ == "__main__":
    main()
