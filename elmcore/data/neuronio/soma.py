"""The release's soma target preparation (docs/spec.md §5, task heads), in one place for reader,
loss, evaluation and head."""

import numpy as np

from elmcore.engine.backend import array_module

SOMA_CAP_MV = -55.0
SOMA_BIAS_MV = -67.7
SOMA_SCALE = 0.1


def prepare_soma(soma_mv, scale=SOMA_SCALE):
    """Release target prep: cap at −55 mV, subtract −67.7 mV, multiply by ``scale`` (1 for eval, in mV)."""
    xp = array_module(soma_mv)
    return (xp.minimum(soma_mv, SOMA_CAP_MV) - SOMA_BIAS_MV) * scale


def soma_training_target(soma_mV):
    """Capped at -55 mV, minus the bias -67.7 mV, times 0.1 (the release's training target)."""
    return prepare_soma(np.asarray(soma_mV)).astype(np.float32)


def soma_eval_target(soma_mV):
    """Capped at -55 mV and bias-subtracted, in mV (the release's evaluation target)."""
    return prepare_soma(np.asarray(soma_mV), scale=1.0).astype(np.float32)
