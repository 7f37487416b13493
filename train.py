#!/usr/bin/env python3
"""Train or fine-tune the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU,
on one device or many (torchrun).

    python train.py --data photos/ --out runs/mine                        # fine-tune the published weights
    python train.py --synthetic 2000 --steps 50 --device cpu --out runs/demo
    python train.py --data svhn/train --data svhn/extra --init scratch --preset readme --device npu --out runs/svhn
    torchrun --nproc-per-node 8 train.py --data svhn/train --data svhn/extra --init scratch --preset readme --device npu --out runs/svhn8
    python train.py --resume --out runs/svhn                               # go on where a run stopped
    python train.py --benchmark --device cpu --batch-size 32               # training images/s, no data needed

Data: --data folders in the forms eval_accuracy.py reads (digitStruct.mat, labels.json,
labels.csv), cropped by the same protocol into an on-disk cache once; --synthetic N adds the
project's own rendered house numbers. Validation: --val DIR, else a seeded --val-fraction split.
The recipe's defaults are potterhsu/SVHNClassifier-PyTorch's (SGD, momentum 0.9, weight decay
5e-4, lr 0.01 x0.9 every 10,000 steps, batch 32, validation every 1,000 steps, stop after 100
validations without improvement); --preset readme is its README's batch-512 run.
Outputs in --out: model-<step>.pth (plain fp32 state dicts with the published keys, written
when validation improves, the last --keep kept), training_state.pt (for --resume), log.jsonl and
curves.png. Ctrl-C saves a resumable state. Exit status: 0 done; 2 usage errors; 130 Ctrl-C.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from model import HEADS, SVHNModel, WeightsError, flops_per_image, model_from_state_dict
from svhn import cli, devices, roofline
from svhn.distributed import Ranks
from svhn.checkpoints import find_checkpoint, load_state_dict, save_atomic
from svhn.dataset import CropSet, batch_tensor, concat, load_folder
from svhn.images import CROP, RESIZE
from svhn.labels import LabelError
from svhn.synthetic import STYLES, FontError, describe_fonts, make_set, set_name
from svhn.text import printable, shown

PRESETS = {"readme": {"batch_size": 512, "lr": 0.16, "lr_step": 625}}
STATE_FILE = "training_state.pt"
RECIPE = ("batch_size", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma", "val_every", "patience", "keep", "amp", "seed")
DATA = ("data", "synthetic", "synthetic_style", "val", "val_fraction")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data", action="append", default=[], metavar="DIR", help="labelled folder (repeat for several)")
    group.add_argument("--synthetic", type=cli.non_negative_int, default=0, metavar="N", help="add N synthetic house numbers (seeded by --seed)")
    group.add_argument("--synthetic-style", choices=sorted(STYLES), default="plain", help="their look (default: %(default)s)")
    group.add_argument("--val", metavar="DIR", help="validation folder (default: a seeded --val-fraction of the data)")
    group.add_argument("--val-fraction", type=float, default=0.1, help="(default: %(default)s)")
    group.add_argument("--cache", metavar="DIR", help="crop cache (default: ~/.cache/svhn-ascend)")
    group.add_argument("--workers", type=cli.positive_int, default=2, help="threads decoding images into the cache (default: %(default)s)")
    group = parser.add_argument_group("model")
    group.add_argument("--init", default=None, metavar="CHECKPOINT|scratch", help="weights to start from (default: the checkpoint inference.py finds, i.e. fine-tuning)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its training_state.pt")
    group = parser.add_argument_group("recipe")
    group.add_argument("--preset", choices=sorted(PRESETS), help="readme: batch 512, lr 0.16, x0.9 every 625 steps")
    group.add_argument("--steps", type=cli.positive_int, default=20000, help="(default: %(default)s)")
    group.add_argument("--batch-size", type=cli.positive_int, default=32, help="per device (default: %(default)s)")
    group.add_argument("--lr", type=float, default=0.01, help="(default: %(default)s)")
    group.add_argument("--momentum", type=float, default=0.9, help="(default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    group.add_argument("--lr-step", type=cli.positive_int, default=10000, help="steps between lr decays (default: %(default)s)")
    group.add_argument("--lr-gamma", type=float, default=0.9, help="(default: %(default)s)")
    group.add_argument("--val-every", type=cli.positive_int, default=1000, help="(default: %(default)s)")
    group.add_argument("--patience", type=cli.positive_int, default=100, help="validations without improvement before stopping (default: %(default)s)")
    group.add_argument("--keep", type=cli.positive_int, default=5, help="model-<step>.pth files kept (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="auto, cpu, npu, cuda (default: %(default)s); under torchrun each rank takes its LOCAL_RANK")
    group.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast dtype (fp16 with a gradient scaler; default: off)")
    group.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction, help="(default: on for CPU and CUDA, off for NPU)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, metavar="DIR", help="checkpoints, training state, log.jsonl, curves.png")
    group.add_argument("--benchmark", action="store_true", help="time training steps on random data at --batch-size, print images/s, and exit")
    args = parser.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        if parser.get_default(key) == getattr(args, key):
            setattr(args, key, value)
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    if not (args.data or args.synthetic or args.resume or args.benchmark):
        parser.error("give --data DIR and/or --synthetic N (or --resume, or --benchmark)")
    return args


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, ranks: Ranks) -> tuple[CropSet, CropSet]:
    """The training and validation crops (rank 0 builds the cache, the others wait and reuse it)."""
    cache = Path(args.cache).expanduser() if args.cache else Path.home() / ".cache" / "svhn-ascend"
    report = cli.error if ranks.main else (lambda line: None)
    folders = [Path(d) for d in args.data]
    for folder in folders + ([Path(args.val)] if args.val else []):
        if not folder.is_dir():
            cli.die(f"{printable(folder)}: no such folder")
    val_folder = Path(args.val) if args.val else None

    def build() -> list[CropSet]:
        if args.synthetic:
            make_set(folders[-1], args.synthetic, args.seed, STYLES[args.synthetic_style])
        return [load_folder(folder, cache / "crops", args.workers, report) for folder in folders + ([val_folder] if val_folder else [])]

    try:
        if args.synthetic:
            folders.append(cache / set_name(args.synthetic, args.seed, args.synthetic_style))
            if ranks.main:
                cli.note(f"synthetic house numbers: {args.synthetic}, seed {args.seed}, {describe_fonts()}")
        # rank 0 renders and caches; the others then find it all in the cache
        sets = build() if ranks.main else []
        if ranks.world > 1:
            dist.barrier()
            sets = sets or build()
        if val_folder:
            *sets, val = sets
        data = concat(sets)
        if val_folder:
            train = data
        else:
            order = np.random.default_rng(args.seed).permutation(len(data))
            n_val = max(1, int(round(len(data) * args.val_fraction)))
            val, train = subset(data, np.sort(order[:n_val])), subset(data, np.sort(order[n_val:]))
    except (LabelError, FontError) as e:
        cli.die(str(e))
    if len(train) == 0 or len(val) == 0:
        cli.die(f"no usable training or validation images ({len(train)} and {len(val)})")
    return train, val


def subset(data: CropSet, index: np.ndarray) -> CropSet:
    return CropSet(data.crops[index], data.targets[index], [data.files[i] for i in index])


class Batches:
    """The training batches, a pure function of (seed, step): a DistributedSampler order per
    epoch, random 54x54 crops from a generator seeded by the step. So --resume at step k
    continues exactly where step k left off."""

    def __init__(self, data: CropSet, batch_size: int, seed: int, ranks: Ranks) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.sampler = DistributedSampler(range(len(data)), num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = max(1, len(self.sampler) // batch_size)
        self.rank = ranks.rank
        self._epoch, self._order = None, None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, np.fromiter(iter(self.sampler), dtype=np.int64)
        index = np.sort(self._order[position * self.batch_size : (position + 1) * self.batch_size])
        if len(index) < self.batch_size:  # fewer images than one batch: repeat them
            index = np.resize(self._order, self.batch_size)
        rng = np.random.default_rng([self.seed, step, self.rank])
        offsets = rng.integers(0, RESIZE - CROP + 1, size=(len(index), 2))
        return batch_tensor(self.data.crops[index], offsets), torch.from_numpy(self.data.targets[index])


# --------------------------------------------------------------------------------------------
# Model, loss, validation
# --------------------------------------------------------------------------------------------


def initial_weights(args: argparse.Namespace) -> tuple[SVHNModel, str]:
    if args.init == "scratch":
        torch.manual_seed(args.seed)
        return SVHNModel(), "scratch"
    try:
        path = find_checkpoint(args.init)
        return model_from_state_dict(load_state_dict(path), printable(path)), shown(path)
    except WeightsError as e:
        if args.init is not None:
            cli.die(f"{e} (or pass --init scratch to train from random weights)")
        cli.note(f"nothing to fine-tune ({e}); training from scratch, as --init scratch does")
        args.init = "scratch"
        return initial_weights(args)


def loss_fn(logits: tuple[torch.Tensor, ...], targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The sum of the six heads' cross-entropies, as the published recipe trains; and each."""
    losses = [nn.functional.cross_entropy(out.float(), targets[:, i]) for i, out in enumerate(logits)]
    return sum(losses), [float(x.detach()) for x in losses]


def validate(model: nn.Module, val: CropSet, ranks: Ranks, batch_size: int, channels_last: bool) -> tuple[float, float]:
    """(correct, scored) over every rank's shard: correct when all five digit heads match (10
    past the end), the published accuracy. Counts are summed over ranks in float32."""
    model.eval()
    correct = scored = 0
    shard = np.arange(ranks.rank, len(val), ranks.world)
    with torch.inference_mode():
        for start in range(0, len(shard), batch_size):
            index = shard[start : start + batch_size]
            x = batch_tensor(val.crops[index]).to(ranks.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            digits = torch.stack([h.argmax(1) for h in model(x)[1:]], 1).cpu()
            correct += int((digits == torch.from_numpy(val.targets[index][:, 1:])).all(1).sum())
            scored += len(index)
    model.train()
    return tuple(ranks.sum([correct, scored]))


# --------------------------------------------------------------------------------------------
# State on disk
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


def published_state_dict(model: nn.Module) -> dict:
    """Plain fp32 CPU tensors under the published key names (no module. / _orig_mod.)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in inner.state_dict().items()}


class Log:
    """log.jsonl, one JSON object a line, appended (a resumed run goes on in the same file)."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(cli.plain(record)) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []


def plot_curves(log: Log, path: Path) -> None:
    """Training loss and validation accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = log.records()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    a.set(xlabel="step", ylabel="loss (sum of the six heads)", title="training loss")
    b.plot([r["step"] for r in val], [100 * r["val_accuracy"] for r in val], marker="o", ms=3)
    b.set(xlabel="step", ylabel="whole-number accuracy %", title="validation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, ranks: Ranks) -> int:
    """Training images/s at --batch-size on random data; on the CPU also the fraction of the
    fp32 peak that a training step reaches (a step costs 3x the forward FLOPs per image)."""
    torch.manual_seed(0)
    model = SVHNModel().to(ranks.device).train()
    channels_last = (ranks.device.type != "npu") if args.channels_last is None else args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=args.momentum, weight_decay=args.weight_decay)
    x = torch.rand(args.batch_size, 3, CROP, CROP, device=ranks.device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(args.batch_size, len(HEADS), dtype=torch.int64, device=ranks.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def step() -> None:
        with torch.autocast(ranks.device.type, dtype=amp, enabled=amp is not None):
            loss, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timer = devices.DeviceTimer(ranks.device)
    for _ in range(3):
        step()
    times = sorted(timer(step) for _ in range(10))
    median = times[len(times) // 2]
    result = {"device": str(ranks.device), "device_name": devices.device_name(ranks.device), "batch_size": args.batch_size, "amp": args.amp,
              "images_per_s": args.batch_size / median, "step_ms": median * 1e3, "torch": torch.__version__}
    if ranks.device.type == "cpu":
        peak = roofline.fp32_peak()
        result["fp32_peak_gflops"] = peak["fp32_peak_gflops"]
        result["train_step_gflops"] = 3 * flops_per_image() * result["images_per_s"] / 1e9
        result["fraction_of_peak"] = result["train_step_gflops"] / peak["fp32_peak_gflops"]
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    ranks = Ranks(args.device)
    try:
        if args.benchmark:
            return benchmark(args, ranks) if ranks.main else 0
        return train(args, out, ranks)
    finally:
        ranks.close()


def train(args: argparse.Namespace, out: Path, ranks: Ranks) -> int:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".writable").touch()
        (out / ".writable").unlink()
    except OSError as e:
        cli.die(f"{printable(out)}: cannot write here ({e.strerror})")
    state = None
    if args.resume:
        path = out / STATE_FILE
        if not path.is_file():
            cli.die(f"{printable(path)}: no training state to resume (train into --out {printable(out)} first)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in RECIPE:
            setattr(args, key, state["args"][key])
        for key in DATA:
            setattr(args, key, state["args"][key])
    train_set, val_set = load_data(args, ranks)
    if state is None:
        model, source = initial_weights(args)
    else:
        model, source = SVHNModel(), f"resumed at step {state['step']}"
        model.load_state_dict(state["model"])
    channels_last = (ranks.device.type != "npu") if args.channels_last is None else args.channels_last
    model = model.to(ranks.device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[ranks.device.index] if ranks.device.type != "cpu" else None) if ranks.world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=args.lr_gamma)  # stepped per iteration
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(ranks.device.type, enabled=args.amp == "fp16")
    step, best, stale, kept = 0, -1.0, 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best, stale, kept = state["step"], state["best"], state["stale"], list(state["kept"])
        set_rng_state(state["rng"], ranks.device)
    else:
        torch.manual_seed(args.seed)  # dropout's draws, the same from here on every run of this seed
    batches = Batches(train_set, args.batch_size, args.seed, ranks)
    log = Log(out / "log.jsonl", ranks.main)
    saved_args = {k: getattr(args, k) for k in (*RECIPE, *DATA, "init")}

    def save_state() -> None:
        if ranks.main:
            save_atomic({"args": saved_args, "step": step, "model": published_state_dict(net), "optimizer": opt.state_dict(),
                         "scheduler": schedule.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                         "rng": rng_state(ranks.device), "best": best, "stale": stale, "kept": kept}, out / STATE_FILE)

    if ranks.main:
        print(f"training {len(train_set)} images, validating on {len(val_set)}, from {source}, on {ranks.world} x {ranks.device} "
              f"({devices.device_name(ranks.device)}), batch {args.batch_size} per device, lr {args.lr}, amp {args.amp}; out {shown(out)}", file=sys.stderr)
    if state is None:  # where the run starts from, for the log; it is not a score to beat
        correct, scored = validate(net, val_set, ranks, max(args.batch_size, 64), channels_last)
        log.write({"step": 0, "val_accuracy_before": correct / scored, "val_correct": correct, "val_scored": scored, "init": source})
        if ranks.main:
            cli.note(f"validation accuracy before training: {100 * correct / scored:.2f} % ({int(correct)} of {int(scored)})")
    bar = tqdm(total=args.steps, initial=step, unit="step", file=sys.stderr, disable=None if ranks.main else True)
    seen, clock = 0, time.perf_counter()
    try:
        while step < args.steps:
            x, y = batches(step)
            x, y = x.to(ranks.device, non_blocking=True), y.to(ranks.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(ranks.device.type, dtype=amp, enabled=amp is not None):
                loss, per_head = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            schedule.step()
            step += 1
            seen += len(x)
            bar.update()
            if not math.isfinite(sum(per_head)):
                cli.die(f"the loss is {sum(per_head)} at step {step}: lower --lr, or use --amp off", cli.EXIT_FAILED)
            if step % 10 == 0 or step == args.steps:
                devices.synchronize(ranks.device)
                rate = seen * ranks.world / (time.perf_counter() - clock)
                peak = devices.peak_memory(ranks.device)
                log.write({"step": step, "loss": sum(per_head), "loss_per_head": dict(zip(HEADS, per_head)), "lr": schedule.get_last_lr()[0],
                           "images_per_s": rate, "device_memory_mb": None if peak is None else peak / 2**20})
                bar.set_postfix(loss=f"{sum(per_head):.3f}", img_s=f"{rate:.0f}")
                seen, clock = 0, time.perf_counter()
            if step % args.val_every == 0 or step == args.steps:
                correct, scored = validate(net, val_set, ranks, max(args.batch_size, 64), channels_last)
                accuracy = correct / scored
                in_sync = ranks.same_everywhere(model)
                improved = accuracy > best
                if improved:
                    best, stale = accuracy, 0
                    if ranks.main:
                        kept.append(step)
                        save_atomic(published_state_dict(net), out / f"model-{step}.pth")
                        for old in kept[: -args.keep]:
                            (out / f"model-{old}.pth").unlink(missing_ok=True)
                        kept = kept[-args.keep :]
                else:
                    stale += 1
                log.write({"step": step, "val_accuracy": accuracy, "val_correct": correct, "val_scored": scored, "best": best,
                           "saved": f"model-{step}.pth" if improved else None, "ranks": ranks.world, "ranks_in_sync": in_sync})
                save_state()
                if stale >= args.patience:
                    if ranks.main:
                        cli.note(f"stopping at step {step}: {stale} validations without improvement")
                    break
    except KeyboardInterrupt:
        bar.close()
        save_state()
        if ranks.main:
            print(f"interrupted at step {step}; the state is saved: python train.py --resume --out {shown(out)}", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    bar.close()
    if ranks.main:
        plot_curves(log, out / "curves.png")
        print(f"done: step {step}, best validation accuracy {100 * best:.2f} %, checkpoints {', '.join(f'model-{s}.pth' for s in kept)} in {shown(out)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
