"""The training engine every network here trains through: one device or many (torchrun), AMP,
exact resume, keep-best checkpoints written atomically, log.jsonl and curves.png, Ctrl-C and
SIGTERM, and the training benchmark.

What is specific to a network is a Task (svhn.recognizer_training.RecognizerTask for the
recognizer): its module, batches, loss, validation score and checkpoint. The engine owns the
rest. Batches are a pure function of (seed, step, rank), not a DataLoader: a resumed run takes
exactly the batch it would have taken, and an image that cannot be used was already left out
(and named) when the task read its data.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from svhn import devices, exits, roofline
from svhn.checkpoints import save_atomic
from svhn.distributed import Ranks
from svhn.files import check_writable, remove_leftovers, write_bytes_atomic
from svhn.output import plain
from svhn.text import one_line, printable, shown

STATE_FILE = "training_state.pt"
CHECKPOINT_PREFIXES = ("model", "localizer")  # the recognizer's model-<step>.pth, the localizer's localizer-<step>.pth
LOCK_FILE = ".lock"
AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Recipe:
    """How to train: the optimizer, its schedule, validation and checkpointing, precision."""

    steps: int = 20000
    batch_size: int = 32
    optimizer: str = "sgd"  # or "adamw" (momentum is then Adam's beta1)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step": x lr_gamma every lr_step steps; "cosine": to 0 at `steps`, after `warmup` steps of linear rise
    lr_step: int = 10000
    lr_gamma: float = 0.9
    warmup: int = 0
    ema: float = 0.0  # > 0: validate and checkpoint an exponential moving average of the weights with this decay
    val_every: int = 1000
    patience: int = 100
    keep: int = 5
    dtype: str = "float32"  # autocast dtype; float16 adds a gradient scaler
    seed: int = 0


RECIPE_CHOICES = {"optimizer": ("sgd", "adamw"), "schedule": ("step", "cosine")}
OLD_RECIPE = {"optimizer": "sgd", "schedule": "step", "warmup": 0, "ema": 0.0}  # what a state saved before these fields existed trained with


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per iteration. The cosine's warm-up is at most a fifth of the run, so that a
    short fine-tune is not spent rising."""
    if recipe.schedule == "cosine":
        rise, steps = max(1, min(recipe.warmup, recipe.steps // 5)), max(1, recipe.steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / rise) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.lr_step, gamma=recipe.lr_gamma)


class EMA:
    """An exponential moving average of a model's weights (parameters and BatchNorm statistics),
    the decay ramped as (1 + n) / (10 + n) up to `decay` so that early updates are not swamped
    by the random start. On small, noisy data it validates steadier and better than the raw
    weights (measured on the localizer: README)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                mine.mul_(d).add_(theirs.detach(), alpha=1 - d)
            else:
                mine.copy_(theirs)


class Task(Protocol):
    """What the engine needs to know of a network."""

    name: str  # "recognizer"
    score_name: str  # what validation measures, for the messages and curves
    checkpoint_prefix: str  # checkpoints are <prefix>-<step>.pth

    def describe(self) -> str: ...  # "1,000 images, validating on 100"

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # a pure function of the step

    def random_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # for the benchmark

    def loss(self, outputs, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...  # total, and each part

    def validate(self, net: nn.Module, ranks: Ranks, channels_last: bool) -> dict: ...  # "score" and its counts

    def checkpoint(self, model: nn.Module) -> dict: ...  # the state dict written as model-<step>.pth

    def flops_per_image(self) -> int: ...


class TrainingError(exits.UserError):
    """A run that cannot start or go on; the message names the file or folder."""


def held_out(n: int, fraction: float, seed: int, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The validation and training indices (each sorted) of n items: a seeded permutation cut into
    folds of round(n * fraction) items; fold K is validation. The folds are disjoint, so runs over
    K = 0, 1, ... hold out every item once (cross-validation); fold 0 is the split of --val-fraction."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    folds = math.ceil(n / n_val)
    if n and fold >= folds:  # no items at all is the caller's error (nothing usable), not the fold's
        raise TrainingError(f"--val-fold {fold}: {n} images in folds of {n_val} (--val-fraction {fraction:g}) make {folds} folds, 0 to {folds - 1}")
    return np.sort(order[fold * n_val:(fold + 1) * n_val]), np.sort(np.concatenate([order[:fold * n_val], order[(fold + 1) * n_val:]]))


# --------------------------------------------------------------------------------------------
# The run's folder
# --------------------------------------------------------------------------------------------


class RunFolder:
    """--out, held for one run: created, checked writable, locked (a second run into it is
    refused; the lock is an flock, so it dies with its process), cleared of temporary files
    that killed writes left. Only rank 0 touches it; the others wait at a barrier."""

    def __init__(self, path: Path, ranks: Ranks) -> None:
        self.path, self.ranks, self._lock = path, ranks, None
        if ranks.main:
            try:
                path.mkdir(parents=True, exist_ok=True)
                check_writable(path)
            except OSError as e:
                raise TrainingError(f"{printable(path)}: cannot write here ({e.strerror})") from None
            self._lock = open(path / LOCK_FILE, "a")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise TrainingError(f"{printable(path)}: another training run is writing here (its lock {LOCK_FILE} is held); wait for it, or use another --out") from None
            remove_leftovers(path)
        ranks.barrier()

    def holds_a_run(self) -> bool:
        return (self.path / STATE_FILE).exists() or bool(self.checkpoints()) or (self.path / "log.jsonl").exists()

    def checkpoints(self) -> list[Path]:
        return [p for prefix in CHECKPOINT_PREFIXES for p in self.path.glob(f"{prefix}-*.pth")]

    def clear(self) -> None:
        """Remove an earlier run's checkpoints, state, log and curves (--overwrite)."""
        if self.ranks.main:
            for p in [*self.checkpoints(), self.path / STATE_FILE, self.path / "log.jsonl", self.path / "curves.png"]:
                p.unlink(missing_ok=True)
        self.ranks.barrier()


def read_state(path: Path) -> dict:
    """A training_state.pt as written by this engine, or TrainingError naming what is wrong."""
    if not path.is_file():
        raise TrainingError(f"{printable(path)}: no training state to resume (train into --out {printable(path.parent)} first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, pickled code: the unpickler raises anything
        raise TrainingError(f"{printable(path)}: not a readable training state, truncated or corrupt ({type(e).__name__}: {one_line(e, 120)})") from None
    missing = [k for k in ("args", "task", "step", "model", "optimizer", "scheduler", "rng", "best", "stale", "kept") if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingError(f"{printable(path)}: not a training state of this version ({len(missing)} entries missing: {', '.join(missing[:4])})")
    return state


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    mod = devices.accelerator(device)
    if mod is not None:
        state["device"] = mod.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    mod = devices.accelerator(device)
    if mod is not None and "device" in state:
        mod.set_rng_state(state["device"], device)


def plain_state_dict(model: nn.Module) -> dict:
    """Plain fp32 CPU tensors, without DDP's module. prefix."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in inner.state_dict().items()}


class Log:
    """log.jsonl, one JSON object a line, appended (a resumed run goes on in the same file)."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(plain(record)) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []


def plot_curves(records: list[dict], path: Path, score_name: str) -> None:
    """Training loss and the validation score against the step (the starting score at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [(r["step"], r["val_accuracy_before"]) for r in records if "val_accuracy_before" in r]
    val += [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    b.plot([s for s, _ in val], [100 * v for _, v in val], marker="o", ms=3)
    b.set(xlabel="step", ylabel=f"{score_name} %", title="validation")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int = 0
    best: float = -1.0
    stale: int = 0
    kept: list = field(default_factory=list)


class Trainer:
    """One run of a task: the model on its device(s), the optimizer, the loop."""

    def __init__(self, task: Task, model: nn.Module, recipe: Recipe, folder: RunFolder, ranks: Ranks, channels_last: bool | None,
                 state: dict | None = None, saved_args: dict | None = None) -> None:
        self.task, self.recipe, self.folder, self.ranks = task, recipe, folder, ranks
        self.channels_last = devices.default_channels_last(ranks.device, channels_last)
        self.model = model.to(ranks.device).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if ranks.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[ranks.device.index] if ranks.device.type != "cpu" else None)
        self.opt = make_optimizer(self.model.parameters(), recipe)
        self.schedule = make_schedule(self.opt, recipe)
        self.ema = EMA(self.model, recipe.ema) if recipe.ema > 0 else None
        self.amp = AMP_DTYPES[recipe.dtype]
        self.scaler = torch.amp.GradScaler(ranks.device.type, enabled=recipe.dtype == "float16")
        self.progress = Progress()
        self.log = Log(folder.path / "log.jsonl", ranks.main)
        self.saved_args = saved_args or {}
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.progress = Progress(state["step"], state["best"], state["stale"], list(state["kept"]))
            if self.ema is not None and state.get("ema") is not None:
                self.ema.model.load_state_dict(state["ema"])
                self.ema.updates = state["step"]
            set_rng_state(state["rng"], ranks.device)
        else:
            torch.manual_seed(recipe.seed)  # dropout's draws, the same from here on every run of this seed

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x, y = x.to(self.ranks.device, non_blocking=True), y.to(self.ranks.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.ranks.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss, parts = self.task.loss(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return parts

    @property
    def kept_model(self) -> nn.Module:
        """What is validated and written as a checkpoint: the EMA of the weights, when on."""
        return self.ema.model if self.ema is not None else self.model

    def save_state(self) -> None:
        if self.ranks.main:
            p = self.progress
            self._write({"args": self.saved_args, "task": self.task.name, "step": p.step, "model": plain_state_dict(self.net),
                         "optimizer": self.opt.state_dict(), "scheduler": self.schedule.state_dict(),
                         "ema": plain_state_dict(self.ema.model) if self.ema is not None else None,
                         "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                         "rng": rng_state(self.ranks.device), "best": p.best, "stale": p.stale, "kept": p.kept}, STATE_FILE)

    def _write(self, obj: dict, name: str) -> None:
        """An atomic write; a full disk or another write error ends the run with one line, the
        files already under their final names (the last complete state among them) intact."""
        try:
            save_atomic(obj, self.folder.path / name)
        except OSError as e:
            raise TrainingError(f"{printable(self.folder.path / name)}: cannot be written ({e.strerror or one_line(e)}); "
                                f"the last complete files in {printable(self.folder.path)} are kept", exits.EXIT_FAILED) from None

    def checkpoint_name(self, step: int) -> str:
        return f"{self.task.checkpoint_prefix}-{step}.pth"

    def validate(self) -> dict:
        if self.ema is None:
            return self.task.validate(self.net, self.ranks, self.channels_last)
        result = self.task.validate(self.ema.model, self.ranks, self.channels_last)
        self.ema.model.eval()  # the task puts what it validated back in training mode
        return result

    def starting_score(self, source: str, to_beat: bool) -> None:
        """Where the run starts from, for the log and the curves; when the run starts from trained
        weights (to_beat), also the score a checkpoint must beat to be written."""
        result = self.validate()
        self.log.write({"step": 0, "val_accuracy_before": result["score"], **result["counts"], "init": source})
        if to_beat:
            self.progress.best = result["score"]
        if self.ranks.main:
            exits.note(f"validation {self.task.score_name} before training: {100 * result['score']:.2f} % ({result['summary']})"
                       + ("; a checkpoint is written only when a validation beats it" if to_beat else ""))

    def after_validation(self, result: dict) -> bool:
        """Keep the checkpoint if it is the best so far; True when patience has run out."""
        p, r = self.progress, self.recipe
        improved = result["score"] > p.best
        if improved:
            p.best, p.stale = result["score"], 0
            if self.ranks.main:
                p.kept.append(p.step)
                self._write(self.task.checkpoint(self.kept_model), self.checkpoint_name(p.step))
                for old in p.kept[: -r.keep]:
                    (self.folder.path / self.checkpoint_name(old)).unlink(missing_ok=True)
                p.kept = p.kept[-r.keep :]
        else:
            p.stale += 1
        in_sync = self.ranks.same_everywhere(self.model)
        self.log.write({"step": p.step, "val_accuracy": result["score"], **result["counts"], "best": p.best,
                        "saved": self.checkpoint_name(p.step) if improved else None, "ranks": self.ranks.world, "ranks_in_sync": in_sync})
        self.save_state()
        return p.stale >= r.patience

    def loop(self) -> None:
        """Train to recipe.steps (or until patience runs out), logging every 10 steps."""
        p, r = self.progress, self.recipe
        bar = tqdm(total=r.steps, initial=p.step, unit="step", file=sys.stderr, disable=None if self.ranks.main else True)
        seen, clock = 0, time.perf_counter()
        try:
            while p.step < r.steps:
                x, y = self.task.batch(p.step)
                parts = self.step(x, y)
                p.step += 1
                seen += len(x)
                bar.update()
                total = sum(parts.values())
                if not math.isfinite(total):
                    raise TrainingError(f"the loss is {total} at step {p.step}: lower --lr, or train in --dtype float32", exits.EXIT_FAILED)
                if p.step % 10 == 0 or p.step == r.steps:
                    devices.synchronize(self.ranks.device)
                    rate = seen * self.ranks.world / (time.perf_counter() - clock)
                    peak = devices.peak_memory(self.ranks.device)
                    self.log.write({"step": p.step, "loss": total, "loss_per_head": parts, "lr": self.schedule.get_last_lr()[0],
                                    "images_per_s": rate, "device_memory_mb": None if peak is None else peak / 2**20})
                    bar.set_postfix(loss=f"{total:.3f}", img_s=f"{rate:.0f}")
                    seen, clock = 0, time.perf_counter()
                if (p.step % r.val_every == 0 or p.step == r.steps) and self.after_validation(self.validate()):
                    if self.ranks.main:
                        exits.note(f"stopping at step {p.step}: {p.stale} validations without improvement")
                    break
        finally:
            bar.close()


def train(trainer: Trainer, source: str, fresh: bool, from_trained: bool) -> int:
    """Run the trainer to the end; Ctrl-C or SIGTERM saves a resumable state first. A run that
    starts from trained weights (from_trained) writes a checkpoint only when it beats them."""
    ranks, out = trainer.ranks, trainer.folder.path
    if ranks.main:
        r = trainer.recipe
        print(f"training {trainer.task.describe()}, from {source}, on {ranks.world} x {ranks.device} "
              f"({devices.device_name(ranks.device)}), batch {r.batch_size} per device, lr {r.lr}, dtype {r.dtype}; out {shown(out)}", file=sys.stderr)
    try:
        if fresh:
            trainer.starting_score(source, from_trained)
        trainer.loop()
    except KeyboardInterrupt as stop:
        trainer.save_state()
        if ranks.main:
            what = "terminated" if isinstance(stop, exits.Terminated) else "interrupted"
            print(f"{what} at step {trainer.progress.step}; the state is saved: python train.py --resume --out {shown(out)}", file=sys.stderr)
        return exits.EXIT_TERMINATED if isinstance(stop, exits.Terminated) else exits.EXIT_INTERRUPTED
    p = trainer.progress
    if ranks.main:
        plot_curves(trainer.log.records(), out / "curves.png", trainer.task.score_name)
        if p.kept:
            print(f"done: step {p.step}, best validation {trainer.task.score_name} {100 * p.best:.2f} %, checkpoints "
                  f"{', '.join(trainer.checkpoint_name(s) for s in p.kept)} in {shown(out)}")
        else:
            print(f"done: step {p.step}; no validation beat the starting weights ({trainer.task.score_name} {100 * p.best:.2f} %), "
                  f"so no checkpoint was written: the starting weights remain the best ({source})")
    return 0


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def benchmark(task: Task, model: nn.Module, recipe: Recipe, device: torch.device, channels_last: bool | None) -> dict:
    """Training images/s at recipe.batch_size on random data; on the CPU also the fraction of
    the fp32 peak that a training step reaches (a step costs 3x the forward FLOPs per image)."""
    channels_last = devices.default_channels_last(device, channels_last)
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), replace(recipe, lr=1e-4))
    ema = EMA(model, recipe.ema) if recipe.ema > 0 else None
    x, y = task.random_batch(recipe.batch_size)
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = AMP_DTYPES[recipe.dtype]

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)

    timer = devices.DeviceTimer(device)
    for _ in range(3):
        step()
    times = sorted(timer(step) for _ in range(10))
    median = times[len(times) // 2]
    result = {"task": task.name, "device": str(device), "device_name": devices.device_name(device), "batch_size": recipe.batch_size,
              "dtype": recipe.dtype, "images_per_s": recipe.batch_size / median, "step_ms": median * 1e3, "torch": torch.__version__}
    if device.type == "cpu":
        peak = roofline.fp32_peak()
        result["fp32_peak_gflops"] = peak["fp32_peak_gflops"]
        result["train_step_gflops"] = 3 * task.flops_per_image() * result["images_per_s"] / 1e9
        result["fraction_of_peak"] = result["train_step_gflops"] / peak["fp32_peak_gflops"]
    return result
