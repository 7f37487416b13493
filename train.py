#!/usr/bin/env python3
"""Train or fine-tune the published SVHN recognizer on an Ascend NPU, a CUDA GPU or the CPU,
on one device or many (torchrun).

    python train.py --data photos/ --out runs/mine                        # fine-tune the published weights
    python train.py --synthetic 2000 --steps 50 --device cpu --out runs/demo
    python train.py --data svhn/train --data svhn/extra --init scratch --preset readme --device npu --out runs/svhn
    torchrun --nproc-per-node 8 train.py --data svhn/train --data svhn/extra --init scratch --preset readme --device npu --out runs/svhn8
    python train.py --resume --out runs/svhn                               # go on where a run stopped
    python train.py --benchmark --device cpu --batch-size 32               # training images/s, no data needed
    python train.py --task localizer --data svhn/train --synthetic 4000 --init scratch --out runs/loc   # the localizer

Data: --data folders in the forms eval_accuracy.py reads (digitStruct.mat, labels.json,
labels.csv), cropped by the same protocol into an on-disk cache once; --synthetic N adds the
project's own rendered house numbers. Validation: --val DIR, else a seeded --val-fraction split
(--val-fold K holds out the K-th such fold: cross-validation).
The recipe's defaults are potterhsu/SVHNClassifier-PyTorch's (SGD, momentum 0.9, weight decay
5e-4, lr 0.01 x0.9 every 10,000 steps, batch 32, validation every 1,000 steps, stop after 100
validations without improvement); --preset readme is its README's batch-512 run. The
localizer's own defaults (--task localizer): AdamW lr 0.002, cosine after 200 warm-up steps,
4,000 steps, an EMA of the weights (decay 0.999) validated and checkpointed.
Outputs in --out: model-<step>.pth (plain fp32 state dicts with the published keys, written
when validation improves, the last --keep kept), training_state.pt (for --resume), log.jsonl and
curves.png. Ctrl-C and SIGTERM save a resumable state. Exit status: 0 done; 1 the run failed (a
non-finite loss, a full disk); 2 usage errors; 130 Ctrl-C; 143 SIGTERM.
"""

import svhn  # noqa: F401  (first: keeps torch_npu from loading itself at `import torch`)

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

import localizer
from model import SVHNModel, WeightsError, model_from_state_dict
from svhn import exits, flags
from svhn.checkpoints import find_checkpoint, find_localizer, load_localizer, load_state_dict
from svhn.localizer_training import LocalizerTask, Photos, SceneData, load_data
from svhn.distributed import Ranks
from svhn.recognizer_training import DataSpec, RecognizerTask, load_crops
from svhn.synthetic import STYLES
from svhn.text import printable, shown
from svhn.training import OLD_RECIPE, RECIPE_CHOICES, STATE_FILE, Recipe, RunFolder, Trainer, TrainingError, benchmark, read_state, train

PRESETS = {"readme": {"batch_size": 512, "lr": 0.16, "lr_step": 625}}
# The localizer's recipe, where its flags are not given (measured: README, localizer)
TASK_DEFAULTS = {"localizer": {"steps": 4000, "optimizer": "adamw", "lr": 0.002, "schedule": "cosine", "warmup": 200, "ema": 0.999,
                               "val_every": 250, "patience": 20, "val_fraction": 0.25}}
DATA = ("task", "arch", "data", "synthetic", "synthetic_style", "val", "val_fraction", "val_fold")
AMP_ALIASES = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("network")
    group.add_argument("--task", choices=("recognizer", "localizer"), default="recognizer",
                       help="the network to train: the recognizer (model.py) or the localizer that finds numbers (localizer.py); default: %(default)s")
    group.add_argument("--arch", choices=sorted(localizer.ARCHS), default=localizer.DEFAULT_ARCH, help="the localizer's architecture (default: %(default)s)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", action="append", default=[], metavar="DIR", help="labelled folder (repeat for several)")
    group.add_argument("--synthetic", type=flags.non_negative_int, default=0, metavar="N",
                       help="add N synthetic images (seeded by --seed): house-number crops for the recognizer, whole scenes for the localizer")
    group.add_argument("--synthetic-style", choices=sorted(STYLES), default="plain", help="their look (default: %(default)s)")
    group.add_argument("--val", metavar="DIR", help="validation folder (default: a seeded --val-fraction of the data)")
    group.add_argument("--val-fraction", type=float, default=None, help="(default: 0.1; --task localizer: 0.25)")
    group.add_argument("--val-fold", type=flags.non_negative_int, default=0, metavar="K",
                       help="hold out the K-th of the seeded --val-fraction folds instead of the first (K = 0, 1, ...: cross-validation; default: 0)")
    group.add_argument("--cache", metavar="DIR", help="crop cache (default: ~/.cache/svhn-ascend)")
    flags.add_workers_arg(group)
    group = parser.add_argument_group("model")
    group.add_argument("--init", default=None, metavar="CHECKPOINT|scratch",
                       help="weights to start from (default: the checkpoint inference.py finds, i.e. fine-tuning; for the localizer, the shipped one)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its training_state.pt")
    group = parser.add_argument_group("recipe")
    group.add_argument("--preset", choices=sorted(PRESETS), help="readme: batch 512, lr 0.16, x0.9 every 625 steps")
    for f in fields(Recipe):
        where = f"; --task localizer: {TASK_DEFAULTS['localizer'][f.name]}" if f.name in TASK_DEFAULTS["localizer"] else ""
        # default None: a flag the user gives wins over --preset and the task's defaults, even when it names the recognizer's value
        if f.name in RECIPE_CHOICES:
            group.add_argument(f"--{f.name}", choices=RECIPE_CHOICES[f.name], default=None, help=f"(default: {f.default}{where})")
        elif f.name != "dtype":
            kind = {"int": flags.positive_int, "float": float}[f.type] if f.name not in ("seed", "warmup") else flags.non_negative_int
            group.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"(default: {f.default}{where})")
    group = parser.add_argument_group("device")
    flags.add_device_arg(group)
    group.add_argument("--dtype", choices=list(AMP_ALIASES.values()), default=None, help="autocast dtype (float16 with a gradient scaler; default: float32)")
    group.add_argument("--amp", choices=list(AMP_ALIASES), default=None, help="the same as --dtype: off, bf16, fp16")
    flags.add_channels_last_arg(group)
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help="checkpoints, training state, log.jsonl, curves.png")
    group.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run: its checkpoints, state, log and curves are removed first")
    group.add_argument("--benchmark", action="store_true", help="time training steps on random data at --batch-size, print images/s, and exit")
    args = parser.parse_args(argv)
    args.given = {f.name for f in fields(Recipe) if f.name != "dtype" and getattr(args, f.name) is not None}
    defaults = {**{f.name: f.default for f in fields(Recipe)}, "val_fraction": 0.1, **TASK_DEFAULTS.get(args.task, {}), **PRESETS.get(args.preset, {})}
    for key, value in defaults.items():
        if key != "dtype" and getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.amp and args.dtype and AMP_ALIASES[args.amp] != args.dtype:
        parser.error(f"--amp {args.amp} and --dtype {args.dtype} disagree; give one")
    args.dtype = args.dtype or AMP_ALIASES[args.amp or "off"]
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    if args.val and args.val_fold:
        parser.error("--val-fold picks the held-out part of --data; it does not apply with --val DIR")
    if not 0 <= args.ema < 1:
        parser.error("--ema must be at least 0 (off) and below 1")
    if not (args.out or args.benchmark):
        parser.error("the following arguments are required: --out")
    if not (args.data or args.synthetic or args.resume or args.benchmark):
        parser.error("give --data DIR and/or --synthetic N (or --resume, or --benchmark)")
    return args


def initial_weights(task: str, arch: str, init: str | None, seed: int) -> tuple[torch.nn.Module, str]:
    """--init's weights (a checkpoint, or scratch), else the checkpoint inference.py finds."""
    if init == "scratch":
        torch.manual_seed(seed)
        return (SVHNModel() if task == "recognizer" else localizer.Localizer(arch)), "scratch"
    try:
        if task == "localizer":
            path = find_localizer(init)
            return load_localizer(path), shown(path)
        path = find_checkpoint(init)
        return model_from_state_dict(load_state_dict(path), printable(path)), shown(path)
    except WeightsError as e:
        if init is not None:
            raise TrainingError(f"{e} (or pass --init scratch to train from random weights)") from None
        exits.note(f"nothing to fine-tune ({e}); training from scratch, as --init scratch does")
        return initial_weights(task, arch, "scratch", seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exits.on_sigterm()
    ranks = Ranks(args.device, exits.note)
    try:
        recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
        if args.benchmark:
            if ranks.main:
                task, model = ((RecognizerTask, SVHNModel()) if args.task == "recognizer"
                               else (LocalizerTask(*([Photos([], [], [])] * 3), args.arch, recipe.batch_size, recipe.seed, ranks), localizer.Localizer(args.arch)))
                print(json.dumps(benchmark(task, model, recipe, ranks.device, args.channels_last), indent=2))
            return 0
        return run(args, recipe, ranks)
    finally:
        ranks.close()


def run(args: argparse.Namespace, recipe: Recipe, ranks: Ranks) -> int:
    folder = RunFolder(Path(args.out), ranks)
    if not args.resume and folder.holds_a_run():
        if not args.overwrite:
            raise TrainingError(f"{printable(folder.path)}: holds an earlier run; continue it with --resume, or start afresh with --overwrite "
                                "(removes its checkpoints, state, log and curves)")
        folder.clear()
    state = read_state(folder.path / STATE_FILE) if args.resume else None
    if state is not None:  # the run goes on with the network, recipe and data it started with
        saved = {**OLD_RECIPE, **state["args"]["recipe"]}
        recipe = Recipe(**{**asdict(recipe), **saved, "steps": args.steps if "steps" in args.given else saved["steps"]})
        for key in DATA:
            setattr(args, key, state["args"].get(key, {"task": "recognizer", "arch": localizer.DEFAULT_ARCH, "val_fold": 0}.get(key)))
    cache = Path(args.cache).expanduser() if args.cache else DataSpec.cache
    if args.task == "recognizer":
        spec = DataSpec(tuple(args.data), args.synthetic, args.synthetic_style, args.val, args.val_fraction, args.val_fold, cache, args.workers, recipe.seed)
        task = RecognizerTask(*load_crops(spec, ranks), recipe.batch_size, recipe.seed, ranks)
    else:
        data = SceneData(tuple(args.data), args.synthetic, args.val, args.val_fraction, args.val_fold, cache, args.workers, recipe.seed)
        task = LocalizerTask(*load_data(data, ranks), args.arch, recipe.batch_size, recipe.seed, ranks)
        if ranks.main:  # the held-out photos, so that the evaluation can score exactly them
            for path in task.val.write_labels(folder.path):
                exits.note(f"validation photos listed in {shown(path)} (eval_accuracy.py --labels)")
    if state is None:
        model, source = initial_weights(args.task, args.arch, args.init, recipe.seed)
    else:
        model, source = (SVHNModel() if args.task == "recognizer" else localizer.Localizer(args.arch)), f"resumed at step {state['step']}"
        model.load_state_dict(state["model"])
    saved = {"recipe": asdict(recipe), **{k: getattr(args, k) for k in DATA}, "init": args.init}
    trainer = Trainer(task, model, recipe, folder, ranks, args.channels_last, state, saved)
    return train(trainer, source, fresh=state is None, from_trained=source != "scratch")


if __name__ == "__main__":
    exits.run(main)
