"""`repro predict --from RUN IMAGE_OR_DIR... [--top 5] [--grid out.png]`: the top-k classes of image files,
with their probabilities, from a run's network (its final one once it has finished).

Each image is tested as the per-epoch validation tests it: the 224 center crop of its resize to a shorter
side of 256, minus the per-pixel mean of the training images (Sec. 3.4). A fine-tuned network carries that
mean and its class names in its run folder; a network trained on ImageNet needs its data root (--data,
data.root or $REPRO_DATA), for the mean image and the class folders' names. An image inside a folder
named after a class has that class as its true label, which the table and the grid show beside the guess.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from repro.contract import FINAL, data_root
from repro.data.imagenet import (UnreadableImage, center_plan, decode, mean_image, normalize, read_header,
                                 resample)
from repro.engine import resolve_device
from repro.errors import ReproError
from repro.reuse.networks import load_network
from repro.run_network import class_folders

BATCH = 32  # images per forward pass; changes no result


@dataclass
class Prediction:
    path: Path
    true: str | None  # the class its folder names, when it names one
    classes: list[str]  # the top-k classes, most probable first
    probabilities: list[float]
    crop: torch.Tensor | None  # uint8 [3, 224, 224]: what the network saw
    problem: str | None = None  # why the file could not be read

    @property
    def correct(self) -> bool | None:
        return None if self.true is None or not self.classes else self.classes[0] == self.true


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The files named, and the image files under the folders named (sorted), in the order given."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*")
                            if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
        elif item.is_file():
            files.append(item)
        else:
            raise ReproError(f"{item}: no such image file or folder")
    if not files:
        raise ReproError(f"no image files in {', '.join(map(str, inputs))} (looked for {', '.join(IMG_EXTENSIONS)})")
    return files


def _crop(path: Path, draft: bool) -> torch.Tensor:
    """The center crop (uint8 [3, 224, 224]) of the 256 resize, as the validation pipeline makes it
    (`draft`: the run's data.draft_decode)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableImage(f"cannot read it ({error.strerror or error})") from None
    header = read_header(data)
    plan = center_plan(header.width, header.height)
    return resample(decode(data, header, plan.resized, draft), plan)[0]


def predict(run_dir: str | Path, inputs: list[str | Path], *, top: int = 5, data: str | None = None,
            device: str = "cpu") -> list[Prediction]:
    run_dir = Path(run_dir)
    device = resolve_device(device, 0)
    finished = (run_dir / FINAL).is_file()
    model, spec, state = load_network(run_dir, device, final=finished)
    if not finished:
        print(f"note: {run_dir} has not finished; its checkpoint of iteration {state['iteration']} predicts",
              file=sys.stderr)
    if spec.data.dataset != "imagenet":
        raise ReproError(f"{run_dir} trained a {spec.data.dataset} network; `repro predict` takes ImageNet "
                         "networks and networks fine-tuned from them")
    if spec.finetune is not None:
        classes, mean = spec.finetune.classes, model.data_mean.cpu()
    else:
        root = data_root("imagenet", data or spec.data.root)
        if root is None:
            raise ReproError(f"{run_dir}'s network expects images minus the mean image of its training set, "
                             "and names classes by its class folders: pass --data with the root it trained on")
        classes = class_folders(Path(root).expanduser() / "train")
        mean = mean_image(Path(root).expanduser() / "train", spec.data.mean_sample_size, seed=0)
    mean = mean.to(device)
    predictions = []
    for path in image_files(inputs):
        true = path.parent.name if path.parent.name in classes else None
        try:
            predictions.append(Prediction(path, true, [], [], _crop(path, spec.data.draft_decode)))
        except UnreadableImage as error:
            predictions.append(Prediction(path, true, [], [], None, str(error)))
    readable = [p for p in predictions if p.crop is not None]
    with torch.inference_mode():
        for start in range(0, len(readable), BATCH):
            chunk = readable[start:start + BATCH]
            x = normalize(torch.stack([p.crop for p in chunk]).to(device), mean, None)
            probabilities = model(x).float().softmax(1).cpu()
            values, indices = probabilities.topk(min(top, probabilities.shape[1]), 1)
            for p, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
                p.classes = [classes[i] if i < len(classes) else f"class {i}" for i in row_indices]
                p.probabilities = row_values
    return predictions


def table(predictions: list[Prediction]) -> str:
    """One line per image and rank: image, true class, rank, class, probability; then the top-1 tally."""
    rows = [("image", "true", "rank", "class", "probability")]
    for p in predictions:
        true = p.true or "?"
        if p.problem:
            rows.append((str(p.path), true, "-", f"unreadable: {p.problem}", ""))
        for rank, (name, probability) in enumerate(zip(p.classes, p.probabilities), 1):
            rows.append((str(p.path) if rank == 1 else "", true if rank == 1 else "", str(rank), name,
                         f"{probability:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    known = [p for p in predictions if p.correct is not None]
    if known:
        lines.append(f"top-1 correct: {sum(p.correct for p in known)} of the {len(known)} images whose folder "
                     "names a class")
    return "\n".join(lines)


def save_grid(predictions: list[Prediction], path: str | Path, columns: int = 6) -> Path:
    """A grid of the crops the network saw, each titled with its guess, probability and true class: green
    when right, red when wrong, black when the true class is unknown."""
    from matplotlib.figure import Figure

    shown = [p for p in predictions if p.crop is not None]
    if not shown:
        raise ReproError("no readable image to draw")
    columns = min(columns, len(shown))
    rows = -(-len(shown) // columns)
    figure = Figure(figsize=(2.4 * columns, 2.8 * rows))
    for i, p in enumerate(shown):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(p.crop.permute(1, 2, 0).numpy())
        axes.set_axis_off()
        colour = {True: "tab:green", False: "tab:red", None: "black"}[p.correct]
        axes.set_title(f"{p.classes[0]} {p.probabilities[0]:.0%}\ntrue: {p.true or '?'}", fontsize=9, color=colour)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
