"""`repro evaluate RUN --protocol center|ten_crop|multi_scale`: a finished run's final network tested on
the validation set of its data, written to RUN/evaluations/<protocol>.json (never over final.json).

- center: the 224 center crop of the 256 resize (the per-epoch error of Figure 4).
- ten_crop: the 10-crop test of Tables 2 and 3 (Sec. 3.4), at the run's eval.ten_crop geometry.
- multi_scale: Table 4's test (Sec. 3.4): fully convolutional, the scores averaged over images resized
  to shorter sides of 224, 256, 384, 480 and 640. Our networks end in global average pooling and one FC
  layer, which is linear, so pooling then FC equals the FC applied at every position (the fully-
  convolutional form) then averaged: the whole image at each scale goes through the network as it is,
  minus the mean image resized to it (fit_mean). Each view is also seen flipped, and the softmax scores
  of the 10 views are averaged as the 10 crops' are. Flips are our reading: Sec. 3.4 does not name them,
  and the dense test of VGG (Simonyan & Zisserman 2015, Sec. 3.2), whose fully-convolutional form it
  adopts, averages each image with its flip.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from repro.contract import FINAL, atomic_write, data_root, run_path
from repro.data.imagenet import (EpochSampler, Unreadable, UnreadableImage, UnreadableImages, decode,
                                 make_loader, normalize, read_header, resized_size)
from repro.data.imagenet_sets import imagenet_datasets
from repro.distributed import Processes
from repro.engine import evaluate, resolve_device
from repro.errors import ReproError
from repro.paper import TABLE4_TOP1_TOP5_ERROR, TABLE4_SCALES
from repro.reuse import PROTOCOLS, evaluation_path, table4_record
from repro.reuse.networks import load_network
from repro.run_network import fit_mean

MULTI_SCALE_SIDES = TABLE4_SCALES  # Sec. 3.4: the shorter sides of the fully-convolutional test (Table 4)
# Ours (the paper is silent): the longer side is center-cropped to at most 3 times the shorter, so that
# one view holds at most 640 x 1920 pixels; rare panoramas lose their ends, 4:3 and 16:9 images nothing.
MAX_ASPECT = 3.0
# Ours: pixels (views x height x width) in one forward pass, which bounds its activation memory whatever
# the image sizes: that of 8 views of 640 x 640 (not measured on a GPU yet). Changes no result.
MAX_BATCH_PIXELS = 8 * 640 * 640
IMAGES_PER_STEP = 16  # images each data-loader step decodes and resizes; changes no result


class ScaledImages(Dataset):
    """The validation images, each decoded once and resized (antialiased bilinear, uint8, as the crops of
    repro/data/imagenet.py) so that its shorter side is each of `sides`, after its longer side is
    center-cropped to at most `max_aspect` times the shorter. An item is ([uint8 [3, h, w] per side],
    target), or (Unreadable, target) for a file that no decoder reads."""

    def __init__(self, folder: ImageFolder, sides: tuple[int, ...] = MULTI_SCALE_SIDES,
                 max_aspect: float = MAX_ASPECT, draft_decode: bool = False):
        self.folder, self.sides, self.max_aspect = folder, tuple(sides), max_aspect
        self.draft_decode = draft_decode  # data.draft_decode of the run

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        try:
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                raise UnreadableImage(f"cannot read it ({error.strerror or error})") from None
            header = read_header(data)
            pixels = decode(data, header, resized_size(header.width, header.height, max(self.sides)),
                            self.draft_decode)
        except UnreadableImage as error:
            return Unreadable(path, str(error)), target
        return self.views(pixels), target

    def views(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        rows, cols = pixels.shape[-2:]
        longest = math.floor(self.max_aspect * min(rows, cols))
        top, left = max(rows - longest, 0) // 2, max(cols - longest, 0) // 2
        pixels = pixels[:, top:top + min(rows, longest), left:left + min(cols, longest)]
        region = pixels[None].contiguous(memory_format=torch.channels_last)  # torch's fast uint8 CPU kernel
        return [F.interpolate(region, size=resized_size(pixels.shape[-1], pixels.shape[-2], side), mode="bilinear",
                              antialias=True, align_corners=False)[0] for side in self.sides]


def multi_scale_probabilities(model: torch.nn.Module, batches, mean: torch.Tensor, device: torch.device,
                              max_batch_pixels: int = MAX_BATCH_PIXELS, unreadable: UnreadableImages | None = None,
                              autocast=nullcontext()) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax scores [N, classes] averaged over every scale and its flip, targets [N]) of the readable
    images of `batches` (lists of ScaledImages items). The views of one scale that share a size go through
    the network together, at most `max_batch_pixels` pixels at a time, under `autocast`."""
    unreadable = UnreadableImages() if unreadable is None else unreadable
    mean = mean.to(device)
    all_scores, all_targets = [], []
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            items = []
            for item, target in batch:
                if isinstance(item, Unreadable):
                    unreadable.record(item.path, item.reason)
                else:
                    items.append((item, target))
            if not items:
                continue
            scores = None
            for scale in range(len(items[0][0])):
                by_size = defaultdict(list)
                for i, (views, _) in enumerate(items):
                    by_size[tuple(views[scale].shape[-2:])].append(i)
                for size, members in by_size.items():
                    pixels = size[0] * size[1]
                    if pixels > max_batch_pixels:
                        raise ReproError(f"a view of {size[0]} x {size[1]} pixels is more than max_batch_pixels="
                                         f"{max_batch_pixels:,}; raise it to at least {pixels:,}")
                    fitted = fit_mean(mean, size)  # not kept across batches: ImageNet has thousands of sizes
                    together = max(1, max_batch_pixels // (2 * pixels))  # images whose two views fit at once
                    for start in range(0, len(members), together):
                        chunk = members[start:start + together]
                        images = torch.stack([items[i][0][scale] for i in chunk]).to(device)
                        # flipped, then minus the mean image, as the crops of training and of the 10-crop test
                        x, mirrored = (normalize(v, fitted, None) for v in (images, images.flip(-1)))
                        with autocast:
                            if 2 * len(chunk) * pixels <= max_batch_pixels:
                                both = model(torch.cat([x, mirrored])).float().softmax(1)
                                view_scores = both[:len(chunk)] + both[len(chunk):]
                            else:  # one image's view and its mirror image do not fit in one pass
                                view_scores = model(x).float().softmax(1) + model(mirrored).float().softmax(1)
                        if scores is None:
                            scores = torch.zeros(len(items), view_scores.shape[1], dtype=torch.float64, device=device)
                        scores[chunk] += view_scores.double()
            all_scores.append(scores / (2 * len(items[0][0])))
            all_targets.append(torch.tensor([target for _, target in items]))
    if not all_scores:
        raise ReproError("no validation image is readable")
    return torch.cat(all_scores).float().cpu(), torch.cat(all_targets)


def errors_of(probabilities: torch.Tensor, targets: torch.Tensor) -> dict:
    """Loss and top-1/top-5 error (%) of averaged softmax scores, as repro.engine.evaluate counts them."""
    top5 = probabilities.topk(min(5, probabilities.shape[1]), 1).indices
    return {"loss": F.nll_loss(probabilities.double().clamp_min(1e-12).log(), targets).item(),
            "error": 100.0 * (top5[:, 0] != targets).double().mean().item(),
            "top5_error": 100.0 * (top5 != targets[:, None]).all(1).double().mean().item()}


def _counted(batches, counter: list[int]):
    for x, y in batches:
        counter[0] += len(y)
        yield x, y


def evaluate_run(run_dir: str | Path, protocol: str, *, data: str | None = None, device: str = "cpu",
                 workers: int = 4, max_batch_pixels: int = MAX_BATCH_PIXELS,
                 sides: tuple[int, ...] = MULTI_SCALE_SIDES) -> tuple[Path, dict]:
    """Test the final network of the finished run `run_dir` with `protocol`; write and return
    RUN/evaluations/<protocol>.json. `sides` other than the paper's are for tests: Table 4 counts
    only evaluations at the paper's scales."""
    if protocol not in PROTOCOLS:
        raise ReproError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    largest = max(sides) * math.floor(MAX_ASPECT * max(sides))  # the widest view the test keeps
    if protocol == "multi_scale" and max_batch_pixels < largest:
        raise ReproError(f"max_batch_pixels={max_batch_pixels:,} holds less than one view of the largest scale "
                         f"({max(sides)} x {math.floor(MAX_ASPECT * max(sides))}); give at least {largest:,}")
    run_dir = Path(run_dir)
    start = time.perf_counter()
    device = resolve_device(device, 0)
    model, spec, state = load_network(run_dir, device)
    if spec.data.dataset != "imagenet":
        raise ReproError(f"{run_dir} trained a {spec.data.dataset} network; `repro evaluate` tests ImageNet "
                         "networks and networks fine-tuned from them (CIFAR-10's test is final.json's)")
    root = data_root(spec.data.dataset, data or spec.data.root)
    if root is None:
        raise ReproError(f"no data folder for {run_dir}: pass --data DIR (the root holding train/ and val/ "
                         "the run trained on) or set $REPRO_DATA")
    datasets = imagenet_datasets(root, seed=spec.seed, mean_sample_size=spec.data.mean_sample_size,
                                 mean_workers=workers, draft_decode=spec.data.draft_decode,
                                 ten_crop=spec.eval.ten_crop, device=device)
    classes = datasets.classes
    if spec.finetune is not None and classes != spec.finetune.classes:
        raise ReproError(f"the class folders of {root} are not the {len(spec.finetune.classes)} classes "
                         f"{run_dir} was fine-tuned on ({len(classes)} found)")
    outputs = getattr(model, "network", model).fc.out_features  # a FinetuneNet wraps its network
    if len(classes) > outputs:
        raise ReproError(f"{root} has {len(classes)} classes, more than the {outputs} outputs of {run_dir}'s network")
    # The precision the run trained and tested in (README: one network, one numeric format); fp32 by default.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.run.precision == "bf16")
    # bn_stats: the BN statistics in use, the run's eval.bn_stats where its checkpoint holds them
    record = {"protocol": protocol, "precision": spec.run.precision, "bn_stats": state["bn_stats"]}
    if protocol == "multi_scale":
        dataset = ScaledImages(ImageFolder(str(Path(root).expanduser() / "val")), sides, MAX_ASPECT,
                               spec.data.draft_decode)
        loader = DataLoader(dataset, batch_size=IMAGES_PER_STEP, num_workers=workers, collate_fn=list)
        probabilities, targets = multi_scale_probabilities(model, loader, datasets.mean, device, max_batch_pixels,
                                                           datasets.unreadable, autocast)
        result, images = errors_of(probabilities, targets), len(targets)
        record.update(scales=list(sides), flips=True, max_aspect=MAX_ASPECT, max_batch_pixels=max_batch_pixels)
    else:
        samples = datasets.val if protocol == "center" else datasets.val_ten_crop
        batch = spec.data.eval_batch_size
        sampler = EpochSampler(len(samples), shuffle=False, seed=spec.seed, batch_size=batch)
        loader = make_loader(samples, sampler, workers, pin_memory=device.type == "cuda",
                             persistent_workers=False, unreadable=datasets.unreadable)
        counter = [0]
        result = evaluate(model, _counted(loader, counter), autocast, Processes(), device)
        images = counter[0]
        record["crops"] = 1 if protocol == "center" else 10
        if protocol == "ten_crop":
            record["ten_crop"] = spec.eval.ten_crop
    record.update({
        "top1_error": result["error"], "top5_error": result["top5_error"], "loss": result["loss"],
        "images": images, "unreadable_images": len(datasets.unreadable), "iteration": state["iteration"],
        "data": str(root), "device": str(device), "seconds": time.perf_counter() - start,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    path = evaluation_path(run_dir, protocol)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2), durable=True)
    return path, record


def evaluate_table4(results: str | Path, suite_path: str | Path, *, data: str | None = None, device: str = "auto",
                    workers: int = 4):
    """`repro table4`: Table 4's multi-scale test of every finished run of the suite's Table 4 networks that
    does not have it yet, one run after another, each written when done: a rerun goes on where a stopped
    one ended. Yields (run folder, record) as each finishes."""
    from repro.suite.plan import read_suite  # the suite file's one reader

    suite = read_suite(suite_path)
    for name in (n for n in TABLE4_TOP1_TOP5_ERROR if n in suite.names()):
        for run_dir in sorted(run_path(results, name, 0).parent.glob("seed*")):
            try:
                finished = json.loads((run_dir / FINAL).read_text()).get("status") == "finished"
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                finished = False
            if finished and table4_record(run_dir) is None:
                yield run_dir, evaluate_run(run_dir, "multi_scale", data=data, device=device, workers=workers)[1]
