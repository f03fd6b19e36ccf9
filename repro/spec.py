"""Experiment specs: YAML files validated at load time into typed, frozen objects.

A spec may name a `base` file (relative to itself) whose keys it overrides, so the recipe of a
dataset is written once. Every default below is the paper's; each says where it comes from.
An unknown key, a wrong type or an impossible value is a SpecError naming the file and the key.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from repro.arguments import DEVICE, DEVICES, MAX_SEED, MAX_WORKERS, shown
from repro.errors import SpecError
from repro.paper import CIFAR_LR_MILESTONES, CIFAR_MAX_ITERS


def _admits_bool(annotation: Any) -> bool:
    return annotation is bool or any(_admits_bool(arg) for arg in get_args(annotation))


class _SpecLoader(yaml.SafeLoader):
    """YAML as a spec may use it. No aliases: nine levels of nine aliases (a "billion laughs") expand
    to 9^9 values from a few hundred bytes. No key given twice in one mapping: YAML says the last one
    would silently win."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a spec; "
                                              "write the value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key.value)} is given "
                                                            "twice in one mapping", key.start_mark)
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """A spec's YAML text (a file or a --set value) read with _SpecLoader."""
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


class _Section(BaseModel):
    # allow_inf_nan: pydantic accepts nan and inf as floats; in a rate or a threshold they are typos
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `true` as 1 in a number: `max_iters: true` would train one iteration."""
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {shown(value)}")
        return value


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
    # Images each BN layer normalises together in training ("ghost" BN): a process holding more normalises
    # each group of `bn_group` separately, so a run is the same network on 1 GPU or 8 (the paper: 32 per GPU
    # on 8 GPUs for ImageNet). None: the whole per-process batch (CIFAR: the paper's 128 is one group).
    bn_group: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        from repro.models.networks import check  # imports torch: when a spec is validated, not on import

        check(self)
        if self.sync_bn and self.bn_group is not None:
            raise ValueError("bn_group: BN over groups of a fixed size and BN synced over every process "
                             "(sync_bn) contradict each other; set one")
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
    workers: int = Field(8, ge=0, le=MAX_WORKERS)  # ImageNet: data-loader processes per training process
    mean_sample_size: int = Field(10_000, ge=1)  # ImageNet: training crops averaged for the per-pixel mean
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # ImageNet: decode+augment in CPU workers or on the GPU; auto: cpu
    # ImageNet, CPU path: JPEGs whose resize at least halves them decoded at 1/2, 1/4 or 1/8 scale in the DCT.
    # Faster for large images but different pixels (README: measured), so opt-in; false is a full decode.
    draft_decode: bool = False
    eval_batch_size: int = Field(500, ge=1)  # images per evaluation step; does not change any result


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
    plateau_patience: int = Field(5, ge=1)  # ImageNet: epochs without improvement of the val error before a drop
    plateau_threshold: float = Field(0.1, ge=0)  # ImageNet: an improvement below this (percentage points) is none
    # Our choice: at most this many plateau drops (the paper gives no floor). Three take 0.1 to 1e-4: the
    # paper's 60e4 iterations are about 120 epochs at batch 256, room for one more than fb.resnet.torch's
    # two in 90 epochs. None: no limit.
    max_lr_drops: Optional[int] = Field(3, ge=0)
    warmup_lr: Optional[float] = None  # ResNet-110/1202: 0.01 until training error < 80% (Sec. 4.2)
    warmup_until_train_error: float = Field(80.0, ge=0, le=100)  # percent; then lr goes back to `lr` and the schedule
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
            raise ValueError("lr_milestones must be strictly increasing positive iterations, got "
                             f"{shown(self.lr_milestones)}")
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
    tensorboard: bool = False  # also write metrics.csv's numbers and each iteration's loss as TensorBoard events

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict) and "bf16" in values:
            raise ValueError("bf16: replaced by run.precision (fp32 or bf16); fp32 is the default")
        return values

    @model_validator(mode="after")
    def _check(self) -> "RunSpec":
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be {DEVICES}, got {shown(self.device)}")
        return self


class EvalSpec(_Section):
    """Evaluations of the finished network, beyond the per-epoch test of the center crop."""

    final: list[Literal["ten_crop"]] = []  # ImageNet: the 10-crop test of Table 2 (Sec. 3.4)
    # Where the 10 crops lie in the 256 resize. full_image: the corners of the whole resize (fb.resnet.torch,
    # the authors' model README); center_square: the corners of its central 256 x 256 square (AlexNet's).
    ten_crop: Literal["full_image", "center_square"] = "full_image"
    # Training images (augmented as in training, at most one epoch) whose BN statistics, averaged after the
    # last iteration, make the "precise" statistics of the final network (pycls's 8192); 0: no such pass.
    precise_bn_images: int = Field(8192, ge=0)
    # The BN statistics the tables and claims read: precise (the average above) or moving (PyTorch's moving
    # averages, momentum 0.1). final.json and the checkpoint hold both; each base spec says its choice.
    bn_stats: Literal["precise", "moving"] = "moving"

    @model_validator(mode="after")
    def _check(self) -> "EvalSpec":
        if self.bn_stats == "precise" and self.precise_bn_images == 0:
            raise ValueError("bn_stats: precise needs precise_bn_images above 0")
        return self


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
            raise ValueError(f"classes: at least 2 distinct class names, got {shown(self.classes)}")
        return self


class Spec(_Section):
    name: str
    model: ModelSpec = Field(default_factory=ModelSpec)  # built when a spec is: importing this module needs no torch
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    run: RunSpec = RunSpec()
    eval: EvalSpec = EvalSpec()
    finetune: Optional[FinetuneSpec] = None  # None: trained from He initialisation (every spec of the paper)
    seed: int = Field(0, ge=0, le=MAX_SEED)  # seeds the He initialisation, the data order and the augmentation

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"must be letters, digits, '_' or '-' (it names the run folder), got {shown(name)}")
        return name

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        expected = {"cifar": "cifar10", "imagenet": "imagenet"}[self.model.arch]
        if self.data.dataset != expected:
            raise ValueError(f"model.arch {self.model.arch} needs data.dataset {expected}, got {self.data.dataset}")
        group = self.model.bn_group
        if group is not None and self.optim.batch_size > group and self.optim.batch_size % group:
            raise ValueError(f"model.bn_group: a batch of {self.optim.batch_size} (optim.batch_size) does not split "
                             f"into groups of {group}")
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
        mapping = read_yaml(text) or {}
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
            raise SpecError(f"{where}: expected KEY=VALUE with a dotted KEY such as optim.lr, got {shown(assignment)}")
        try:
            value = read_yaml(text) if text else None
        except yaml.YAMLError as error:
            raise SpecError(f"{where}: {shown(key)[1:-1]}: the value {shown(text)} is not valid YAML: "
                            f"{_yaml_problem(error)}") from None
        node = result
        for depth, part in enumerate(parents, start=1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"{where}: {shown(key)[1:-1]}: an earlier assignment set {'.'.join(parts[:depth])} to "
                                f"{shown(node)}, which has no keys")
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise SpecError(f"{where}: {shown(key)[1:-1]}: {shown(value)} would replace the keys below "
                            f"{shown(key)[1:-1]} that an earlier assignment set")
        node[leaf] = merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
    return result


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark is not None:
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def validate(mapping: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Spec:
    """Typed spec from a plain mapping, with `overrides` (--set) merged over it; errors name `source`, or
    `--set` where the overrides hold the key (or the mapping alone is valid), and the dotted key."""
    try:
        return Spec.model_validate(_floats_from_scientific(merge(mapping, overrides or {})))
    except ValidationError as error:
        blame_set = bool(overrides) and _valid(mapping)
        raise SpecError(describe(error, source, overrides, blame_set)) from None


def _valid(mapping: dict[str, Any]) -> bool:
    try:
        Spec.model_validate(_floats_from_scientific(mapping))
    except ValidationError:
        return False
    return True


def _overridden(overrides: dict[str, Any] | None, loc: tuple) -> bool:
    """Whether `overrides` sets the key at `loc` itself (not only keys below it)."""
    node = overrides
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(loc) and not isinstance(node, dict)


# pydantic names each member of a Union that a value failed (`literal['auto']`, `bool`) in its location
_UNION_TAG = re.compile(r"[a-z-]+\[.*\]|bool|int|float|str")


def describe(error: ValidationError, source: str, overrides: dict[str, Any] | None = None,
             blame_set: bool = False) -> str:
    """The first problem on one line, `source: dotted.key: message`, and the keys of the others."""
    problems: dict[str, str] = {}
    for item in error.errors():
        loc = tuple(itertools.takewhile(lambda part: not _UNION_TAG.fullmatch(str(part)), item["loc"]))
        key = shown(".".join(str(part) for part in loc))[1:-1]
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        if key in problems:  # a value of a Union fails each member: `auto` or a boolean
            problems[key] += " or " + message.removeprefix("Input should be ")
            continue
        where = "--set" if blame_set or _overridden(overrides, loc) else source
        problems[key] = f"{where}: {key}: {message}" if key else f"{where}: {message}"
    first, *more = problems.values()
    others = list(problems)[1:]
    return first + (f" (and {len(others)} more: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
                    if others else "")


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
    spec = validate(_read_yaml(path), str(path), overrides)
    late = [m for m in spec.optim.lr_milestones if m >= spec.optim.max_iters]
    if spec.optim.lr_schedule == "milestones" and late:
        where = "--set" if (overrides or {}).get("optim", {}).keys() & {"max_iters", "lr_milestones"} else path
        raise SpecError(f"{where}: optim.lr_milestones: {shown(late)} lie at or beyond optim.max_iters "
                        f"{spec.optim.max_iters}, where they would never divide the lr; give a shorter run earlier "
                        "milestones, or [] for none")
    return spec
