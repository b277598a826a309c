"""The training loop: epochs × batches, validation, best-model selection, checkpoints, resume.

A run directory holds:
  run.json        the settings of the run (so ``--resume`` needs nothing else)
  last.npz        the latest checkpoint (parameters, optimiser, RNG state, position)
  best.npz        the model with the best validation metric so far
  metrics.jsonl   one JSON record per step ("step") and per epoch ("epoch")
  summary.json    final figures, written when the run ends

Determinism: every random draw comes from generators seeded by (seed, epoch):
the data order and windows from one, input dropout from another whose state is
saved in each checkpoint. A resumed run therefore replays the interrupted epoch's
batches, skips those already trained on, and ends bit-identical (on the CPU) to a
run that was never interrupted.
"""

import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np

from .checkpoint import load_file, save_checkpoint, save_model
from .config import ELMConfig
from .errors import ELMError
from .evaluate import evaluate, metric_value
from .fileio import atomic_write_text
from .losses import LOSS_FUNCTIONS
from .models import build_model
from .optim import Optimizer, cosine_lr

RUN_FILE = "run.json"
LAST = "last.npz"
BEST = "best.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


# What `elm train` runs with no task given: a Branch-ELM on the adding problem at
# length 200, generated in memory (no download). Measured on a 2-core CPU it
# passes validation MSE 0.01 after about 8 epochs (~20 s) and ends near 3e-4.
DEFAULT_RUN = {
    "task": "adding",
    "task_options": {"length": 200, "n": 10000},
    "model": {"version": "branch_elm_v2", "num_memory": 30, "memory_tau_max": 500.0},
    "epochs": 20,
    "lr": 5e-3,
}


class TrainingDiverged(ELMError):
    """The loss or a gradient became non-finite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainSettings:
    task: str = DEFAULT_RUN["task"]
    data_dir: Optional[str] = None
    task_options: dict = dataclasses.field(default_factory=dict)
    model: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    batches_per_epoch: Optional[int] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    input_dropout: float = 0.0
    burn_in: int = 0
    eval_batch_size: int = 64
    valid_max_batches: Optional[int] = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_every: int = 50
    run_dir: Optional[str] = None

    def validate(self):
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1),
                  ("lr", self.lr > 0 and math.isfinite(self.lr)), ("min_lr", 0 <= self.min_lr <= self.lr),
                  ("input_dropout", 0 <= self.input_dropout < 1), ("burn_in", self.burn_in >= 0),
                  ("checkpoint_every", self.checkpoint_every >= 1), ("warmup_steps", self.warmup_steps >= 0),
                  ("eval_batch_size", self.eval_batch_size >= 1)]
        if self.batches_per_epoch is not None:
            checks.append(("batches_per_epoch", self.batches_per_epoch >= 1))
        for name, ok in checks:
            if not ok:
                raise ELMError(f"training setting '{name}' has an impossible value: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ELMError(f"unknown training setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


class Trainer:
    """Runs (or resumes) one training run in ``settings.run_dir``."""

    def __init__(self, settings: TrainSettings, task=None, progress=True, log=print):
        settings.validate()
        self.settings = settings
        self.progress = progress
        self.log = log
        if task is None:
            from .data.registry import get_task
            task = get_task(settings.task, data_dir=settings.data_dir, seed=settings.seed, **settings.task_options)
        self.task = task
        self.loss_fn = LOSS_FUNCTIONS[task.loss]
        self.run_dir = settings.run_dir or os.path.join(
            "runs", f"{settings.task}-{time.strftime('%Y%m%d-%H%M%S')}")

    # ---- setup -------------------------------------------------------------
    def model_config(self):
        d = {**self.task.model_defaults(), **self.settings.model}
        for key in ("num_input", "num_output"):
            if d[key] != getattr(self.task, key):
                raise ELMError(f"model {key} = {d[key]} does not match task '{self.task.name}' "
                               f"({getattr(self.task, key)})")
        return ELMConfig.from_dict(d)

    def batches_per_epoch(self):
        n = math.ceil(self.task.num_examples("train") / self.settings.batch_size)
        if self.settings.batches_per_epoch is not None:
            n = min(n, self.settings.batches_per_epoch) if n else self.settings.batches_per_epoch
        if n <= 0:
            raise ELMError(f"task '{self.task.name}' has no training examples")
        return n

    def _new_state(self):
        s = self.settings
        os.makedirs(self.run_dir, exist_ok=True)
        if os.path.exists(os.path.join(self.run_dir, LAST)):
            raise ELMError(f"run directory {self.run_dir} already holds a run; use --resume {self.run_dir} "
                           "or choose another --run-dir")
        cfg = self.model_config()
        self.model = build_model(cfg, seed=s.seed, dtype=s.dtype, device=s.device)
        self.optimizer = self._make_optimizer()
        self.position = {"step": 0, "epoch": 0, "batch": 0, "dropout_rng": None,
                         "best_metric": None, "best_step": None}
        atomic_write_text(os.path.join(self.run_dir, RUN_FILE),
                          json.dumps(dataclasses.asdict(s), indent=2) + "\n")
        self._truncate_metrics(0, 0)

    def _make_optimizer(self):
        s = self.settings
        return Optimizer({k: self.model.params[k] for k in self.model.trainable_keys}, kind=s.optimizer,
                         lr=s.lr, weight_decay=s.weight_decay, clip_norm=s.clip_norm)

    def _restore(self):
        path = os.path.join(self.run_dir, LAST)
        loaded = load_file(path)
        if loaded.kind != "elmcore-checkpoint":
            raise ELMError(f"{path} is a model file, not a training checkpoint")
        self.model = loaded.build_model(dtype=self.settings.dtype, device=self.settings.device)
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(loaded.optim_state)
        self.position = dict(loaded.meta["position"])
        self._truncate_metrics(self.position["step"], self.position["epoch"])

    @classmethod
    def resume(cls, run_dir, progress=True, log=print, task=None, **overrides):
        path = os.path.join(run_dir, RUN_FILE)
        if not os.path.exists(os.path.join(run_dir, LAST)):
            raise ELMError(f"cannot resume: no checkpoint {os.path.join(run_dir, LAST)}")
        try:
            with open(path) as f:
                settings = TrainSettings.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ELMError(f"cannot resume: {path} is missing or corrupt ({e})") from None
        settings = dataclasses.replace(settings, run_dir=run_dir, **overrides)
        trainer = cls(settings, task=task, progress=progress, log=log)
        trainer._resuming = True
        return trainer

    # ---- metrics log ---------------------------------------------------------
    def _metrics_path(self):
        return os.path.join(self.run_dir, METRICS)

    def _truncate_metrics(self, step, epoch):
        """Drop records past the checkpoint we restart from, so the log tells one consistent story."""
        path = self._metrics_path()
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a kill
                    if (rec.get("type") == "step" and rec["step"] <= step) or \
                            (rec.get("type") == "epoch" and rec["epoch"] < epoch):
                        kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(path, "".join(kept))

    def _record(self, rec):
        with open(self._metrics_path(), "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- checkpoints -----------------------------------------------------------
    def _meta(self):
        return {"position": self.position, "step": self.position["step"], "epoch": self.position["epoch"],
                "best_metric": self.position["best_metric"], "metric_name": self.task.metric,
                "task": self.task.name}

    def _save_checkpoint(self):
        save_checkpoint(os.path.join(self.run_dir, LAST), self.model.config, self.model.state_dict(),
                        self.optimizer.state_dict(), self._meta(), dtype=self.settings.dtype)

    # ---- the loop ---------------------------------------------------------------
    def run(self):
        s = self.settings
        if getattr(self, "_resuming", False):
            self._restore()
        else:
            self._new_state()
        per_epoch = self.batches_per_epoch()
        total_steps = per_epoch * s.epochs
        self.log(f"run {self.run_dir}: task {self.task.name}, {self.model.config.version}, "
                 f"{self.model.num_parameters} parameters, {s.epochs} epochs x {per_epoch} batches of "
                 f"{s.batch_size} ({s.device}, {s.dtype})")
        start_time = time.perf_counter()
        samples_seen = 0
        last_valid = None
        while self.position["epoch"] < s.epochs:
            epoch = self.position["epoch"]
            skip = self.position["batch"]
            dropout_rng = np.random.default_rng([s.seed, epoch, 1])
            if skip and self.position["dropout_rng"] is not None:
                dropout_rng.bit_generator.state = self.position["dropout_rng"]
            data_rng = np.random.default_rng([s.seed, epoch])
            bar = _progress(per_epoch, skip, f"epoch {epoch + 1}/{s.epochs}", self.progress)
            epoch_loss, epoch_n = 0.0, 0
            t_epoch = time.perf_counter()
            for b, batch in enumerate(self.task.batches("train", s.batch_size, rng=data_rng, shuffle=True)):
                if b >= per_epoch:
                    break
                if b < skip:
                    continue
                loss, norm, lr = self._train_step(batch, dropout_rng, total_steps)
                self.position.update(step=self.position["step"] + 1, batch=b + 1,
                                     dropout_rng=dropout_rng.bit_generator.state)
                n = len(batch.X)
                samples_seen += n
                epoch_loss += loss * n
                epoch_n += n
                rate = samples_seen / max(time.perf_counter() - start_time, 1e-9)
                self._record({"type": "step", "step": self.position["step"], "epoch": epoch, "batch": b,
                              "loss": loss, "lr": lr, "grad_norm": norm, "samples_per_s": rate})
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.4g}", "samples/s": f"{rate:.0f}"}
                    if last_valid is not None:
                        post[self.task.metric] = f"{last_valid:.4g}"
                    bar.set_postfix(post)
                if self.position["step"] % s.checkpoint_every == 0:
                    self._save_checkpoint()
            if bar is not None:
                bar.close()
            valid = self._validate()
            last_valid = metric_value(self.task, valid)
            improved = self._is_better(last_valid)
            if improved:
                self.position.update(best_metric=last_valid, best_step=self.position["step"])
                save_model(os.path.join(self.run_dir, BEST), self.model.config, self.model.state_dict(),
                           dtype=s.dtype)
            self._record({"type": "epoch", "epoch": epoch, "step": self.position["step"],
                          "train_loss": epoch_loss / max(epoch_n, 1),
                          "valid": valid, "best": improved, "seconds": time.perf_counter() - t_epoch})
            self.log(f"epoch {epoch + 1}/{s.epochs}: train loss {epoch_loss / max(epoch_n, 1):.4g}, "
                     f"valid {self.task.metric} {last_valid:.4g}{' (best)' if improved else ''}")
            self.position.update(epoch=epoch + 1, batch=0, dropout_rng=None)
            self._save_checkpoint()
        return self._finish(time.perf_counter() - start_time, samples_seen)

    def _train_step(self, batch, dropout_rng, total_steps):
        s = self.settings
        X = batch.X
        if s.input_dropout > 0:
            keep = dropout_rng.random(X.shape) >= s.input_dropout
            X = X * keep / np.float32(1 - s.input_dropout)
        lr = cosine_lr(self.position["step"], total_steps, s.lr, s.min_lr, s.warmup_steps)
        Y, cache = self.model.forward(X, return_cache=True)
        target = self.model.xp.asarray(batch.target)
        if self.task.loss == "neuronio":
            loss, dY = self.loss_fn(Y, target, burn_in=s.burn_in)
        else:
            loss, dY = self.loss_fn(Y, target)
        step = self.position["step"] + 1
        if not math.isfinite(loss):
            self._diverged(f"the loss is {loss} at step {step}")
        grads = self.model.backward(dY, cache)
        xp = self.model.xp
        bad = [k for k, g in grads.items() if not bool(xp.all(xp.isfinite(g)))]
        if bad:
            self._diverged(f"the gradient of {bad[0]} is not finite at step {step}")
        norm = self.optimizer.step(grads, lr=lr)
        return loss, norm, lr

    def _diverged(self, what):
        last = os.path.join(self.run_dir, LAST)
        where = (f"the last good checkpoint is {last} (step {load_file(last).meta.get('step')})"
                 if os.path.exists(last) else "no checkpoint was written yet")
        self._record({"type": "diverged", "step": self.position["step"] + 1, "message": what})
        raise TrainingDiverged(f"training stopped: {what} (epoch {self.position['epoch'] + 1}); {where}. "
                               "Try a lower --lr or --clip-norm.")

    def _validate(self):
        split = "valid" if self.task.num_examples("valid") else "test"
        if not self.task.num_examples(split):
            split = "train"
        options = {}
        if self.task.loss == "neuronio" and hasattr(self.task, "simulation_groups"):
            options["max_files"] = 1
            return evaluate(self.model, self.task, split, batch_size=self.settings.eval_batch_size, **options)
        from .evaluate import evaluate_batches
        return evaluate_batches(self.model, self.task, split, self.settings.eval_batch_size,
                                self.settings.valid_max_batches)

    def _is_better(self, value):
        best = self.position["best_metric"]
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _finish(self, seconds, samples):
        summary = {"run_dir": self.run_dir, "task": self.task.name, "steps": self.position["step"],
                   "epochs": self.position["epoch"], "metric": self.task.metric,
                   "best_valid_metric": self.position["best_metric"], "best_step": self.position["best_step"],
                   "parameters": self.model.num_parameters, "seconds": seconds,
                   "samples_per_s": samples / seconds if seconds > 0 else None,
                   "settings": dataclasses.asdict(self.settings)}
        best_path = os.path.join(self.run_dir, BEST)
        if self.task.num_examples("test") and os.path.exists(best_path):
            best = load_file(best_path).build_model(dtype=self.settings.dtype, device=self.settings.device)
            summary["test"] = evaluate(best, self.task, "test", batch_size=self.settings.eval_batch_size)
            self.log(f"test {self.task.metric} of the best model: {summary['test'][self.task.metric]:.4g}")
        atomic_write_text(os.path.join(self.run_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
        return summary


def _progress(total, initial, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
