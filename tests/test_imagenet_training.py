"""An ImageNet run end to end on generated JPEGs: the same engine, run folder and resume, with top-5
error per epoch and the 10-crop test in final.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from repro.data.generated import write_imagenet

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["run.device=cpu", "run.progress=log", "data.workers=1", "data.mean_sample_size=16",
            "data.eval_batch_size=4", "optim.batch_size=8", "optim.max_iters=6",
            "optim.lr_schedule=milestones", "optim.lr_milestones=[4]"]
# Every warning of torchvision's image decoders shown, in the trainer and in its DataLoader workers
# (they inherit the environment), which Python's default filters would hide outside __main__.
SHOW_DECODER_WARNINGS = "always::DeprecationWarning:torchvision.io.image"
TORCHVISION_DEPRECATION = "image decoding and encoding capabilities of TorchVision are deprecated"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"), classes=4, n_train=8, n_val=2, short_side=(240, 300))


def train(data: Path, results: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "repro", "train", str(ROOT / "experiments" / "imagenet" / "resnet18.yaml"),
               "--data", str(data), "--results", str(results)]
    return subprocess.run(command + [a for s in SETTINGS for a in ("--set", s)], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": SHOW_DECODER_WARNINGS})


def test_imagenet_run_writes_top5_and_ten_crop_errors(data, tmp_path):
    done = train(data, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / "runs" / "imagenet_resnet18" / "seed0"
    frame = pd.read_csv(folder / "metrics.csv")
    assert "test_top5_error" in frame.columns and frame.iteration.tolist() == [4, 6]  # 32 images / 8
    assert (frame.test_top5_error <= frame.test_error).all()
    final = json.loads((folder / "final.json").read_text())
    assert final["status"] == "finished"
    for key in ("ten_crop_top1_error", "ten_crop_top5_error", "center_top1_error", "center_top5_error"):
        assert 0 <= final[key] <= 100
    assert final["center_top1_error"] == frame.test_error.iloc[-1]
    # 8 validation images: every error is a multiple of 12.5%
    assert final["ten_crop_top1_error"] % 12.5 == 0
    # JPEGs are decoded by TorchCodec: no deprecation of torchvision's decoders reaches the user
    assert TORCHVISION_DEPRECATION not in done.stdout + done.stderr + (folder / "log.txt").read_text()


def test_damaged_jpegs_cost_no_epoch_and_are_counted_in_the_log_and_final_json(tmp_path):
    data = write_imagenet(tmp_path / "imagenet", classes=4, n_train=8, n_val=2, short_side=(240, 300))
    classes = sorted(p.name for p in (data / "train").iterdir())
    damaged = [data / "train" / classes[0] / "empty.JPEG", data / "train" / classes[1] / "noise.JPEG",
               data / "val" / classes[2] / "truncated.JPEG"]
    damaged[0].write_bytes(b"")
    damaged[1].write_bytes(os.urandom(5000))
    damaged[2].write_bytes(next((data / "val" / classes[2]).glob("*.JPEG")).read_bytes()[:300])
    done = train(data, tmp_path / "results")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "results" / "runs" / "imagenet_resnet18" / "seed0" / "log.txt").read_text()
    assert all(str(path) in log for path in damaged[:2])  # the training files, named once each
    final = json.loads((tmp_path / "results" / "runs" / "imagenet_resnet18" / "seed0" / "final.json").read_text())
    assert final["status"] == "finished"
    assert {str(path) for path in damaged} <= set(final["unreadable_files"])
    assert final["unreadable_images"] == len(final["unreadable_files"])
