"""`repro finetune --from SOURCE --data DIR [--strategy head|last_stage|all] [--freeze-bn]`: train a
network of this suite (or torchvision's) on a dataset of class folders, DIR/train/<class>/ and
DIR/val/<class>/, with a new FC layer sized to its classes.

The command writes a spec (the recipe of experiments/finetune/<strategy>.yaml, the source's model
section, the dataset, and a `finetune` section naming the source and its classes) and trains it with
repro.engine.train: the run folder, resume, lock and stop signals are those of every run. The source's
weights are read when the run starts and again when it resumes (then replaced by the checkpoint's), so
the source must stay where it is until the run has finished; the finished run folder needs nothing else.
"""
from __future__ import annotations

import re
from pathlib import Path

from repro.contract import FINAL, data_root
from repro.data.imagenet import check_imagenet_root
from repro.errors import ReproError
from repro.reuse import STRATEGIES
from repro.run_network import class_folders, mean_available, read_torchvision, run_spec
from repro.spec import Spec, load_spec, merge, parse_overrides

FINETUNE_SPECS = Path(__file__).resolve().parents[2] / "experiments" / "finetune"  # <strategy>.yaml


def dataset_classes(root: Path) -> list[str]:
    """The class folders of a fine-tuning dataset, the same in train/ and val/, each holding images."""
    train, val = class_folders(root / "train"), class_folders(root / "val")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ReproError(f"the class folders of {root}/train and {root}/val differ ({len(train)} and {len(val)}; "
                         f"only in train: {only_train[:5]}, only in val: {only_val[:5]}): class indices would "
                         "not match. Give both splits the same class folders.")
    check_imagenet_root(root)  # each folder holds images, none lies loose
    return train


def _source(source: Path, source_data: str | None) -> tuple[dict, dict]:
    """(the model section, the `finetune` entries naming the source) of a run folder or a torchvision file."""
    if source.is_file():
        model, _ = read_torchvision(source)
        return model, {"source_format": "torchvision", "name": f"torchvision-resnet{model['depth']}"}
    if not source.is_dir():
        raise ReproError(f"--from {source}: no such run folder or weights file")
    spec = run_spec(source)
    if spec.model.arch != "imagenet":
        raise ReproError(f"{source} trained a {spec.model.arch} network; fine-tuning starts from an ImageNet "
                         "network of Table 1 (its 224 crops and 1000-way head)")
    if spec.finetune is not None:
        raise ReproError(f"{source} is itself a fine-tuned network; fine-tune from the ImageNet run it came from "
                         f"({spec.finetune.source})")
    if not (source / FINAL).is_file():
        raise ReproError(f"{source} has not finished (no {FINAL}); fine-tune from a finished run")
    found = source_data or spec.data.root or data_root("imagenet", None)
    if found is None or not mean_available(Path(found).expanduser().resolve() / "train"):
        raise ReproError(f"{source}'s network expects inputs minus the per-pixel mean image of its training set, "
                         f"which was not found ({'looked under ' + str(found) if found else 'no data folder known'}): "
                         "pass --source-data with the ImageNet root it trained on")
    return spec.model.model_dump(mode="json"), {"source_format": "run", "name": spec.name,
                                                 "source_data": str(Path(found).expanduser().resolve())}


def finetune_spec(source: str | Path, data: str | Path, *, strategy: str | None = None, freeze_bn: bool = False,
                  spec_file: str | Path | None = None, name: str | None = None, seed: int = 0,
                  source_data: str | None = None, assignments: list[str] = ()) -> Spec:
    """The spec of a fine-tuning run: `spec_file` (default experiments/finetune/<strategy>.yaml), the
    source's architecture, the dataset and its classes, then the `--set` assignments."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ReproError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    source, data = Path(source).expanduser().resolve(), Path(data).expanduser().resolve()
    classes = dataset_classes(data)
    model, found = _source(source, source_data)
    spec_file = Path(spec_file) if spec_file else FINETUNE_SPECS / f"{strategy or 'head'}.yaml"
    tune = {"source": str(source), "source_format": found["source_format"], "classes": classes,
            **({"source_data": found["source_data"]} if "source_data" in found else {}),
            **({"strategy": strategy} if strategy else {}), **({"freeze_bn": True} if freeze_bn else {})}
    overrides = merge({"seed": seed, "model": model, "data": {"dataset": "imagenet", "root": str(data)},
                       "finetune": tune}, parse_overrides(list(assignments)))
    spec = load_spec(spec_file, merge({"name": name or "finetune"}, overrides))
    if name is None:  # named after what it is: source, dataset, strategy, frozen BN
        dataset = re.sub(r"[^A-Za-z0-9_-]", "_", data.name)
        tune = spec.finetune
        name = f"ft-{found['name']}-{dataset}-{tune.strategy}" + ("-frozenbn" if tune.freeze_bn else "")
        spec = load_spec(spec_file, merge({"name": name}, overrides))
    return spec
