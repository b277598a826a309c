"""An ELM Network learns a generated character-level corpus: bits per character fall clearly below
the corpus's unigram entropy (the best a model ignoring context can do).

The corpus comes from elmcore.data.text.WordMarkovSource (entropy rate ≈ 0.2 bits per
character, unigram entropy ≈ 3.5), so beating the unigram entropy needs the model to use
the preceding characters. Tiny shapes: a few seconds once the network kernels are compiled.
"""

import math

import numpy as np
import pytest

from elmcore.data import registry
from elmcore.data.text import generate_text
from elmcore.training.evaluate import evaluate_batches
from elmcore.training.losses import cross_entropy_all
from elmcore.training.optim import Optimizer

# Trains a network on a generated corpus: 3-5 s a test.
pytestmark = pytest.mark.slow

NETWORK = dict(version="elm_network", num_neurons=16, num_memory=4, num_branch=4, num_synapse_per_branch=4,
               recurrent_fraction=0.5, memory_tau_max=50.0)
LENGTH, BATCH, STEPS, LR = 32, 16, 150, 1e-2
TRAINER_EPOCHS, TRAINER_LR = 5, 2e-2   # 36 batches per epoch; the cosine schedule wants the larger start
MARGIN_BITS = 0.5


@pytest.fixture(scope="module")
def char_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("char_lm")
    generate_text(out, num_chars=20_000, seed=0)
    return registry.get_task("text", out, length=LENGTH), out


def build_network(fields, seed=0, dtype="float32"):
    """elmcore's ELM Network for a docs/spec.md §7.1 field dict, through the model factory."""
    from elmcore.engine.factory import load_config_dict
    from elmcore.engine.factory import build_model
    return build_model(load_config_dict(fields), seed=seed, dtype=dtype, device="cpu")


def test_network_beats_the_unigram_entropy_on_a_generated_corpus(char_task):
    task, _ = char_task
    model = build_network({**NETWORK, "num_input": task.num_input, "num_output": task.num_output})
    keys = list(model.trainable_keys)
    optimizer = Optimizer({k: model.params[k] for k in keys}, lr=LR, clip_norm=1.0)
    rng = np.random.default_rng(0)
    losses = []
    while len(losses) < STEPS:
        for batch in task.batches("train", BATCH, rng=rng, shuffle=True):
            Y, cache = model.forward(batch.X, return_cache=True)
            loss, dY = cross_entropy_all(Y, batch.target)
            grads = model.backward(dY, cache)
            optimizer.step({k: grads[k] for k in keys})
            losses.append(loss)
            if len(losses) == STEPS:
                break
    assert all(math.isfinite(v) for v in losses)
    result = evaluate_batches(model, task, "valid", batch_size=64)
    chance = task.unigram_entropy("train")
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2))
    assert result["bpc"] < chance - MARGIN_BITS, (result["bpc"], chance)


def test_elm_train_runs_a_network_on_the_text_task(char_task, tmp_path):
    from elmcore.training.train import Trainer, TrainSettings
    task, corpus = char_task
    settings = TrainSettings(task="text", data_dir=str(corpus), task_options={"length": LENGTH},
                             model=dict(NETWORK), epochs=TRAINER_EPOCHS, batch_size=BATCH, lr=TRAINER_LR,
                             eval_batch_size=64, run_dir=str(tmp_path / "run"), checkpoint_every=1000)
    summary = Trainer(settings, progress=False, log=lambda message: None).run()
    assert summary["metric"] == "bpc"
    assert summary["selection_split"] == "valid"
    assert summary["best_metric"] < task.unigram_entropy("train") - MARGIN_BITS
    assert summary["test"]["bpc"] < task.unigram_entropy("train") - MARGIN_BITS
