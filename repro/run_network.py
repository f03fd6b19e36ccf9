"""The network a run trains, below the engine: the He-initialised network of the spec's `model`, or for a
fine-tuning spec (`repro finetune`) its source's network with a new FC layer, from a finished run folder of
this suite or a torchvision ResNet weights file on disk, and the weights loading both need.

A fine-tuning network (FinetuneNet) is the source network with a new FC layer sized to the dataset's
classes, its BN layers optionally frozen (torchvision.ops.FrozenBatchNorm2d), the parameters its
strategy names left trainable, and the input normalization its weights expect kept as buffers, so that
its run folder alone is enough to use it. The trainer builds every network through `build_network`;
repro/reuse/ (evaluate, finetune, predict) builds on this module, never the reverse.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from repro.arguments import shown
from repro.checkpoint import load_checkpoint, load_problem
from repro.contract import CHECKPOINTS, CONFIG, FINAL
from repro.data.imagenet import CACHE_DIR_NAME, CROP, MEAN_FILE, mean_image, user_cache_dir
from repro.errors import ReproError
from repro.models.imagenet import TABLE1
from repro.precise_bn import apply_chosen_statistics
from repro.spec import ModelSpec, Spec, validate

# torchvision's ImageNet weights expect (pixels on the [0, 1] scale - mean) / std, per RGB channel
# (the normalization of their model cards); ours expect pixels minus the per-pixel mean image (Sec. 3.4).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# The architecture of torchvision's ResNets in our terms: projections only where the shape changes
# (option B, torchvision's `downsample`), and the bottleneck's stride on its 3x3 conv ("v1.5").
TORCHVISION_MODEL = {"arch": "imagenet", "residual": True, "shortcut": "B", "bottleneck_stride": "v1.5"}


def fit_mean(mean: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mean image [3, h, w] resized (bilinear) to `size`, for inputs of other sizes than the 224 crops it
    was computed on (the fully-convolutional test); a per-channel mean [3, 1, 1] as it is."""
    if mean.shape[-2:] == (1, 1) or tuple(mean.shape[-2:]) == tuple(size):
        return mean
    return F.interpolate(mean[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


class FinetuneNet(nn.Module):
    """`network` behind the input normalization its weights were trained with. The data pipeline gives
    pixels minus `data_mean` (the fine-tuning dataset's per-pixel mean, Sec. 3.4's recipe); the source
    network expects (pixels - source_mean) / source_std: its own training set's mean image, or
    torchvision's per-channel mean and std."""

    def __init__(self, network: nn.Module, data_mean: torch.Tensor, source_mean: torch.Tensor,
                 source_std: torch.Tensor):
        super().__init__()
        self.network = network
        self.register_buffer("data_mean", data_mean.clone())
        self.register_buffer("source_mean", source_mean.clone())
        self.register_buffer("source_std", source_std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        shift = fit_mean(self.data_mean, size) - fit_mean(self.source_mean, size)
        return self.network((x + shift) / self.source_std)


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d holding its statistics and affine
    parameters as buffers: nothing updates them, in training or not. Returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
            replaced += 1
        else:
            replaced += freeze_batchnorm(child)
    return replaced


def set_trainable(network: nn.Module, strategy: str) -> None:
    """requires_grad on exactly the parameters `strategy` trains: head, the FC layer; last_stage, conv5_x
    (the last stage of Table 1) and the FC layer; all, every parameter."""
    network.requires_grad_(strategy == "all")
    if strategy in ("head", "last_stage"):
        network.fc.requires_grad_(True)
    if strategy == "last_stage":
        network.stages[-1].requires_grad_(True)


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], where: str, what: str,
                 skip: str | None = None) -> None:
    """Load `state` into `network`, every key and shape matching except those starting with `skip`; a
    ReproError that says which differ when the file holds another architecture."""
    wanted = {k: v for k, v in network.state_dict().items() if skip is None or not k.startswith(skip)}
    given = {k: v for k, v in state.items() if skip is None or not k.startswith(skip)}
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    shapes = [f"{k} {tuple(given[k].shape)} instead of {tuple(v.shape)}" for k, v in wanted.items()
              if k in given and tuple(given[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("other shapes", shapes)) if items]
        raise ReproError(f"{where} does not hold {what}: the architectures differ ({'; '.join(problems)})")
    network.load_state_dict(given, strict=skip is None)


# --- run folders ------------------------------------------------------------------------------------


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved spec a run folder was started with, as the mapping its config.yaml holds."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ReproError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ReproError(f"{path}: not valid YAML ({shown(' '.join(str(error).split()))[1:-1]})") from None
    if not isinstance(config, dict):
        raise ReproError(f"{path}: a run's config is a mapping of keys, got {type(config).__name__}")
    return config


def run_spec(run_dir: str | Path) -> Spec:
    """The validated spec a run folder was started with."""
    return validate(read_run_config(run_dir), str(Path(run_dir) / CONFIG))


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network of a run folder with the weights of its newest readable checkpoint, in eval mode,
    and the run's resolved config. Its BN statistics are those of the run's eval.bn_stats, precise ones
    where the checkpoint holds them. Reads only: damaged files stay where they are."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    spec = validate(config, str(run_dir / CONFIG))
    model = spec.model.build()
    # a checkpoint of another network (a crafted or misplaced file) is damage, like an unreadable one
    state = load_checkpoint(run_dir / CHECKPOINTS, map_location=device,
                            use=lambda state: model.load_state_dict(state["model"]))
    if state is None:
        raise ReproError(f"{run_dir} has no checkpoint in {run_dir / CHECKPOINTS}")
    apply_chosen_statistics(model, state, spec.eval.bn_stats)
    return model.to(device).eval(), config


def describe(model: ModelSpec) -> str:
    kind = f"ResNet-{model.depth} {model.shortcut}" if model.residual else f"plain-{model.depth}"
    return f"the {model.arch} {kind} (bottleneck stride {model.bottleneck_stride})"


def final_state(run_dir: Path, device: str | torch.device = "cpu") -> tuple[Spec, dict, dict]:
    """(spec, final.json, checkpoint) of a finished run, the checkpoint being the one of its last
    iteration; a ReproError for a run that is unfinished or diverged or whose final checkpoint is lost."""
    run_dir = Path(run_dir)
    spec = run_spec(run_dir)
    final_path = run_dir / FINAL
    if not final_path.is_file():
        raise ReproError(f"{run_dir} has not finished (no {FINAL}): run the same `repro train` (or `repro "
                         "finetune`) command to finish it first")
    try:
        final = json.loads(final_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ReproError(f"{final_path}: not valid JSON ({error})") from None
    if not isinstance(final, dict) or final.get("status") != "finished":
        status = final.get("status") if isinstance(final, dict) else final
        raise ReproError(f"{run_dir} did not finish: {FINAL} says {status!r}; it has no final network to use")
    state = load_checkpoint(run_dir / CHECKPOINTS, map_location=device)
    if state is None:
        raise ReproError(f"{run_dir} has no checkpoint in {run_dir / CHECKPOINTS}")
    if state["iteration"] != final.get("iterations"):
        raise ReproError(f"the newest readable checkpoint of {run_dir} is from iteration {state['iteration']}, "
                         f"not the final iteration {final.get('iterations')}: the final network's checkpoint "
                         f"({CHECKPOINTS}/last.pt) is unreadable or missing")
    return spec, final, state


# --- torchvision's ImageNet ResNets -----------------------------------------------------------------

_TV_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")


def read_torchvision(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our model section, state_dict in our names) of a torchvision ResNet-18/34/50/101/152 state_dict
    file (e.g. resnet50-0676ba61.pth, as torchvision caches it). Read with weights_only=True; nothing
    is downloaded."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols on the way to refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReproError(f"{path} is not a readable weights file: {load_problem(error)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # torchvision's reference checkpoints
        state = state["model"]
    return torchvision_state(state, str(path))


def torchvision_state(state: dict, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our model section, state_dict in our names) of a torchvision ResNet's state_dict read from `where`."""
    if not isinstance(state, dict) or "layer1.0.conv1.weight" not in state or "conv1.weight" not in state:
        raise ReproError(f"{where} is not a torchvision ResNet state_dict (no conv1.weight and "
                         "layer1.0.conv1.weight): give the .pth file of torchvision.models.resnet18 ... resnet152")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = tuple(len({int(m.group(2)) for k in state if (m := _TV_BLOCK.match(k)) and m.group(1) == str(i)})
                   for i in range(1, 5))
    depth = next((d for d, (b, stages) in TABLE1.items() if (b, stages) == (block, counts)), None)
    if depth is None:
        raise ReproError(f"{where} holds a ResNet of {block} blocks {counts} per stage, not one of Table 1's "
                         f"({', '.join(f'{d}: {b} {s}' for d, (b, s) in TABLE1.items())})")
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^conv1\.", "conv.", key)
        key = re.sub(r"^bn1\.", "bn.", key)
        key = _TV_BLOCK.sub(lambda m: f"stages.{int(m.group(1)) - 1}.{m.group(2)}.", key)
        renamed[key.replace(".downsample.", ".shortcut.")] = value
    return {**TORCHVISION_MODEL, "depth": depth}, renamed


# --- fine-tuning -----------------------------------------------------------------------------------


def class_folders(split: Path) -> list[str]:
    """The class folders of a split, in ImageFolder's (index) order."""
    if not split.is_dir():
        raise ReproError(f"{split} does not exist: a dataset is DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg")
    return sorted(entry.name for entry in split.iterdir() if entry.is_dir())


def mean_available(train_dir: Path) -> bool:
    root = train_dir.parent
    return train_dir.is_dir() or any((folder / MEAN_FILE).is_file()
                                     for folder in (root / CACHE_DIR_NAME, user_cache_dir(root)))


def _source_run_mean(source: Spec, source_data: str | None, where: str) -> torch.Tensor:
    """The per-pixel mean image the source run subtracted: cached beside (or computed from) its data."""
    train_dir = Path(source_data or "") / "train"
    if source_data is None or not mean_available(train_dir):
        raise ReproError(f"{where} trained on inputs minus the per-pixel mean image of its ImageNet training set, "
                         f"which is needed and was not found (looked under {source_data}): pass --source-data "
                         "with the ImageNet root it trained on (its cached mean image is read, or computed)")
    return mean_image(train_dir, source.data.mean_sample_size, seed=0, workers=source.data.workers)


def build_network(spec: Spec, *, load_source: bool = True) -> nn.Module:
    """The network a spec trains: the He-initialised one of `spec.model`, or for a fine-tuning spec a
    FinetuneNet whose weights come from its source (with load_source=False: the same architecture with
    placeholders, to load a checkpoint into)."""
    if spec.finetune is None:
        return spec.model.build()
    tune = spec.finetune
    network = spec.model.build()
    std = torch.ones(3, 1, 1)
    source_mean = torch.zeros(3, CROP, CROP) if tune.source_format == "run" else torch.zeros(3, 1, 1)
    data_mean = torch.zeros(3, CROP, CROP)
    if load_source:
        folders = class_folders(Path(spec.data.root or "") / "train")
        if folders != tune.classes:
            raise ReproError(f"the class folders of {spec.data.root}/train changed since this fine-tuning "
                             f"started: {len(folders)} now, {len(tune.classes)} in its spec")
        if tune.source_format == "torchvision":
            model_section, state = read_torchvision(tune.source)
            source_mean = torch.tensor(TORCHVISION_MEAN)[:, None, None]
            std = torch.tensor(TORCHVISION_STD)[:, None, None]
            source_model, where = ModelSpec(**model_section), tune.source
        else:
            source, _, checkpoint = final_state(Path(tune.source))
            state, source_model, where = checkpoint["model"], source.model, f"{tune.source}/{CHECKPOINTS}"
            source_mean = _source_run_mean(source, tune.source_data, tune.source)
        if source_model != spec.model:
            raise ReproError(f"{tune.source} is {describe(source_model)}, but this fine-tuning's spec says "
                             f"{describe(spec.model)}")
        load_weights(network, state, where, describe(spec.model), skip="fc.")
        data_mean = mean_image(Path(spec.data.root) / "train", spec.data.mean_sample_size, seed=0,
                               workers=spec.data.workers)
    # The new head: PyTorch's default initialisation of a linear layer, as the paper's FC layer (blocks.he_init).
    network.fc = nn.Linear(network.fc.in_features, len(tune.classes))
    if tune.freeze_bn:
        freeze_batchnorm(network)
    set_trainable(network, tune.strategy)
    return FinetuneNet(network, data_mean, source_mean, std)
