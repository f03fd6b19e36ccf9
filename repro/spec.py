"""Experiment specs: YAML files validated at load time into typed, frozen objects.

A spec may name a `base` file (relative to itself) whose keys it overrides, so the recipe of a
dataset is written once. Every default below is the paper's; each says where it comes from.
An unknown key, a wrong type or an impossible value is a SpecError naming the file and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from repro.errors import SpecError
from repro.paper import CIFAR_LR_MILESTONES, CIFAR_MAX_ITERS


class _Section(BaseModel):
    # allow_inf_nan: pydantic accepts nan and inf as floats; in a rate or a threshold they are typos
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Section):
    """The network; repro/models/networks.py holds the rules of each (arch, block) and builds it."""

    arch: Literal["cifar", "imagenet"] = "cifar"
    depth: int = 20
    # The unit stacked in each stage, an entry of repro/models/networks.py: basic or bottleneck. None: the
    # paper's, basic on CIFAR (Sec. 4.2), on ImageNet basic up to 34 layers and bottleneck from 50 (Table 1).
    block: Optional[str] = None
    residual: bool = True  # False gives the plain net: the same layers without shortcuts
    shortcut: str = "A"  # A: zero-padding identity (Sec. 4.2, Table 2); B/C: projections (Sec. 3.3)
    bottleneck_stride: Literal["v1", "v1.5"] = "v1"  # v1: stride on the first 1x1 conv, as the paper's model
    sync_bn: bool = False  # the paper's BN statistics are per GPU; True syncs them across processes

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        from repro.models.networks import check  # imports torch: when a spec is validated, not on import

        check(self)
        return self

    def build(self):
        """The He-initialised network this section describes."""
        from repro.models.networks import build

        return build(self)


class DataSpec(_Section):
    dataset: Literal["cifar10", "imagenet"] = "cifar10"
    root: Optional[str] = None  # else `--data`, then $REPRO_DATA
    verify_checksums: bool = True  # CIFAR-10: reject copies that differ from the canonical download
    download: bool = False  # CIFAR-10: fetch through torchvision when missing (needs network)
    validation_split: bool = False  # CIFAR-10: train on 45k, test on the 5k held out (Sec. 4.2)
    workers: int = 8  # ImageNet: data-loader processes per training process
    mean_sample_size: int = 10_000  # ImageNet: training crops averaged for the per-pixel mean
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # ImageNet: decode+augment in CPU workers or on the GPU; auto: cpu
    eval_batch_size: int = 500  # images per evaluation step; does not change any result


class OptimSpec(_Section):
    batch_size: int = 128  # images per iteration, all processes together (Sec. 4.2; 256 on ImageNet)
    lr: float = 0.1  # Sec. 4.2 / 3.4
    momentum: float = Field(0.9, ge=0, lt=1)  # Sec. 3.4
    weight_decay: float = Field(1e-4, ge=0)  # Sec. 3.4; applied to every parameter, BN included (the paper is silent)
    nesterov: bool = False  # the paper uses plain momentum SGD
    max_iters: int = CIFAR_MAX_ITERS  # 64k on CIFAR (Sec. 4.2), up to 60e4 on ImageNet (Sec. 3.4)
    lr_schedule: Literal["milestones", "plateau"] = "milestones"
    lr_milestones: list[int] = list(CIFAR_LR_MILESTONES)  # iterations where lr is divided (Sec. 4.2)
    lr_factor: float = 0.1  # "divided by 10" (Sec. 3.4, 4.2)
    plateau_patience: int = 5  # ImageNet: epochs without improvement of the val error before a drop
    plateau_threshold: float = 0.1  # ImageNet: an improvement smaller than this (percentage points) is none
    warmup_lr: Optional[float] = None  # ResNet-110/1202: 0.01 until training error < 80% (Sec. 4.2)
    warmup_until_train_error: float = 80.0  # percent; then lr goes back to `lr` and the schedule
    warmup_window: int = 50  # iterations whose running training error decides the warm-up's end
    # Our choice: the paper's warm-up took about 400 iterations; one still running at this cap ends
    # here, logged and recorded in final.json, instead of training at warmup_lr all along.
    warmup_max_iters: int = 2000

    @model_validator(mode="after")
    def _check(self) -> "OptimSpec":
        if self.batch_size < 1 or self.max_iters < 1:
            raise ValueError("batch_size and max_iters must be positive")
        if self.lr <= 0 or (self.warmup_lr is not None and self.warmup_lr <= 0):
            raise ValueError("learning rates must be positive")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must lie in (0, 1), got {self.lr_factor}")
        if self.lr_milestones != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be strictly increasing positive iterations, got {self.lr_milestones}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs a momentum above 0")
        if self.warmup_window < 1 or self.warmup_max_iters < 1:
            raise ValueError("warmup_window and warmup_max_iters must be at least 1 iteration")
        return self


Auto = Literal["auto"]


class RunSpec(_Section):
    """Speed and precision switches. None of them is part of the recipe: a run may resume under other
    values. `auto` is decided from the hardware when the run starts (repro/hardware.py) and the
    resolved value is written to env.json and the log."""

    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    # fp32 is the paper's precision. bf16 autocasts convs and matmuls, which leaves BN outputs, the
    # residual additions and the logits in bf16 too; it changes the numbers, so it is never a default.
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: Union[Auto, bool] = "auto"  # NHWC layout; auto: where it measured faster (CUDA, AVX2+ CPUs)
    compile: Union[Auto, bool] = "auto"  # torch.compile the network; auto: on CUDA only
    cuda_graphs: Union[Auto, bool] = "auto"  # CIFAR: the whole training step as one CUDA graph; auto: on CUDA
    data_on_device: bool = True  # CIFAR: the whole uint8 dataset on the device, augmented there
    # bitwise-equal reruns and resumes on a GPU too (repro/hardware.py set_backends); slower (README)
    deterministic: bool = False
    progress: Literal["auto", "bar", "log"] = "auto"  # a bar on a terminal, log lines otherwise

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict) and "bf16" in values:
            raise ValueError("bf16: replaced by run.precision (fp32 or bf16); fp32 is the default")
        return values

    @model_validator(mode="after")
    def _check(self) -> "RunSpec":
        if self.device not in ("auto", "cpu", "cuda") and not (
                self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


class EvalSpec(_Section):
    """Evaluations of the finished network, beyond the per-epoch test of the center crop."""

    final: list[Literal["ten_crop"]] = []  # ImageNet: the 10-crop test of Table 2 (Sec. 3.4)


class FinetuneSpec(_Section):
    """A run that starts from a trained network with a new head (`repro finetune`, repro/reuse/). Written
    by the command, which checks the paths; experiments/finetune/ holds the recipe's defaults."""

    source: str  # absolute path: a finished run folder of this suite, or a torchvision ResNet state_dict file
    source_format: Literal["run", "torchvision"] = "run"
    # run: the ImageNet root the source trained on, whose cached per-pixel mean is the input its network expects
    source_data: Optional[str] = None
    strategy: Literal["head", "last_stage", "all"] = "head"  # which weights train: fc; conv5_x and fc; all
    freeze_bn: bool = False  # BN statistics and affine parameters fixed, as the paper's detection fine-tuning
    classes: list[str]  # the dataset's class folders in index order; the new FC layer has one output each

    @model_validator(mode="after")
    def _check(self) -> "FinetuneSpec":
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: at least 2 distinct class names, got {self.classes}")
        return self


class Spec(_Section):
    name: str
    model: ModelSpec = Field(default_factory=ModelSpec)  # built when a spec is: importing this module needs no torch
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    run: RunSpec = RunSpec()
    eval: EvalSpec = EvalSpec()
    finetune: Optional[FinetuneSpec] = None  # None: trained from He initialisation (every spec of the paper)
    seed: int = Field(0, ge=0)  # seeds the He initialisation, the data order and the augmentation

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"name must be letters, digits, '_' or '-' (it names the run folder), got {self.name!r}")
        expected = {"cifar": "cifar10", "imagenet": "imagenet"}[self.model.arch]
        if self.data.dataset != expected:
            raise ValueError(f"model.arch {self.model.arch} needs data.dataset {expected}, got {self.data.dataset}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec's mapping with its `base` files merged under it."""
    if path in chain:
        raise SpecError(f"{path}: base files form a cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise SpecError(f"{chain[-1] if chain else path}: spec file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file; a spec is YAML") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(mapping, dict):
        raise SpecError(f"{path}: a spec is a mapping of keys, got {type(mapping).__name__}")
    base = mapping.pop("base", None)
    if base is None:
        return mapping
    if not isinstance(base, str) or not base:
        raise SpecError(f"{path}: base: expected the path of a spec file, relative to this one, got {base!r}")
    return merge(_read_yaml((path.parent / base).resolve(), chain + (path,)), mapping)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings merge key by key; anything else in `override` replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(assignments: list[str], where: str = "--set") -> dict[str, Any]:
    """`["optim.lr=0.05", "run.device=cpu"]` -> nested mapping; values are parsed as YAML. A later
    assignment of the same key wins; one that contradicts an earlier one (`optim=5` and `optim.lr=0.1`)
    is an error."""
    result: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        *parents, leaf = parts = key.split(".")
        if not sep or not all(parts):
            raise SpecError(f"{where}: expected KEY=VALUE with a dotted KEY such as optim.lr, got {assignment!r}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as error:
            raise SpecError(f"{where}: {key}: the value {text!r} is not valid YAML: {_yaml_problem(error)}") from None
        node = result
        for depth, part in enumerate(parents, start=1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"{where}: {key}: an earlier assignment set {'.'.join(parts[:depth])} to {node!r}, "
                                "which has no keys")
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise SpecError(f"{where}: {key}: {value!r} would replace the keys below {key} that an earlier "
                            "assignment set")
        node[leaf] = merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
    return result


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark is not None:
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def validate(mapping: dict[str, Any], source: str) -> Spec:
    """Typed spec from a plain mapping; errors name `source` and the dotted key."""
    try:
        return Spec.model_validate(_floats_from_scientific(mapping))
    except ValidationError as error:
        raise SpecError(describe(error, source)) from None


def describe(error: ValidationError, source: str) -> str:
    """One line per problem: `source: dotted.key: message`."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {key}: {message}" if key else f"{source}: {message}")
    return "\n".join(problems)


def _floats_from_scientific(value: Any) -> Any:
    """PyYAML reads `1e-4` (no dot) as a string; read it as the number everyone means."""
    if isinstance(value, dict):
        return {k: _floats_from_scientific(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_from_scientific(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if "e" in value.lower() and value.strip()[0] in "0123456789+-." else value
        except ValueError:
            return value
    return value


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> Spec:
    """Read, merge with its base files and `overrides`, and validate a spec file to train.

    A spec to train must also reach its milestones: a shortened run that keeps the full run's (`--set
    optim.max_iters=1000` alone) would never divide the lr. A run folder's config.yaml, a record of what
    was trained, is read with `validate` alone, so that older records stay readable."""
    path = Path(path).resolve()
    mapping = _read_yaml(path)
    if overrides:
        mapping = merge(mapping, overrides)
    spec = validate(mapping, str(path))
    late = [m for m in spec.optim.lr_milestones if m >= spec.optim.max_iters]
    if spec.optim.lr_schedule == "milestones" and late:
        raise SpecError(f"{path}: optim.lr_milestones: {late} lie at or beyond optim.max_iters {spec.optim.max_iters}, "
                        "where they would never divide the lr; give a shorter run earlier milestones, or [] for none")
    return spec
