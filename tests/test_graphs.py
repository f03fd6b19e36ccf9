"""The CIFAR step as one CUDA graph gives the same training as the eager step (issue 9): weights
within fp32 rounding and the same CSV rows. Needs a GPU; CI has none, so these skip there.

The graph's update `p -= lr * buf` (lr read from a device tensor) rounds twice where SGD's
`p += -lr * buf` rounds once: at most half an ulp on a few weights per step, which SGD amplifies over
the steps (issue 18: measured on the CPU, the same arithmetic leaves the weights 7e-6 apart as one
vector after these 28 steps at lr 0.02, 2.4e-4 at lr 0.1). So the weights are compared as one
vector, at the gentler rate test_distributed uses, and each element is not."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro import engine
from repro.checkpoint import load_checkpoint
from repro.contract import CHECKPOINTS, EXIT_OK
from repro.data.generated import write_cifar10
from repro.spec import load_spec, parse_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")]

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "resnet20.yaml"
# deterministic: the engine sets cuDNN's flags at each start (set_backends); autotuning could pick other
# kernels for the eager and the graphed run
SETTINGS = ["model.depth=8", "run.device=cuda", "run.deterministic=true", "run.progress=log", "run.compile=false",
            "run.channels_last=false", "data.verify_checksums=false", "data.eval_batch_size=64", "optim.batch_size=32",
            "optim.max_iters=28", "optim.lr_milestones=[16,24]", "optim.lr=0.02"]


def run(data: Path, results: Path, graphs: bool) -> tuple[pd.DataFrame, dict]:
    spec = load_spec(SPEC, parse_overrides(SETTINGS + [f"data.root={data}", f"run.cuda_graphs={str(graphs).lower()}"]))
    assert engine.train(spec, results) == EXIT_OK
    folder = results / "runs" / spec.name / "seed0"
    env = json.loads((folder / "env.json").read_text())["starts"][-1]
    assert env["switches"]["cuda_graphs"] is graphs
    frame = pd.read_csv(folder / "metrics.csv").drop(columns=["epoch_seconds", "images_per_second"])
    return frame, load_checkpoint(folder / CHECKPOINTS)["model"]


def test_n_graphed_steps_equal_n_eager_steps(tmp_path):
    data = write_cifar10(tmp_path / "data", n_train=256, n_test=64)
    eager_rows, eager_weights = run(data, tmp_path / "eager", graphs=False)
    graph_rows, graph_weights = run(data, tmp_path / "graphs", graphs=True)
    pd.testing.assert_frame_equal(graph_rows[["epoch", "iteration", "lr", "train_images", "partial"]],
                                  eager_rows[["epoch", "iteration", "lr", "train_images", "partial"]])
    pd.testing.assert_frame_equal(graph_rows[["train_loss", "test_loss"]], eager_rows[["train_loss", "test_loss"]],
                                  check_exact=False, rtol=1e-3)
    # errors agree to within one image (the last epoch trains 4 x 32 = 128 images; 64 test images)
    assert (abs(graph_rows.train_error - eager_rows.train_error) <= 100 / 128).all()
    assert (abs(graph_rows.test_error - eager_rows.test_error) <= 100 / 64).all()
    names = [name for name, value in eager_weights.items() if value.is_floating_point()]
    eager = torch.cat([eager_weights[name].double().flatten() for name in names])
    graphed = torch.cat([graph_weights[name].double().flatten() for name in names])
    assert (graphed - eager).norm() <= 1e-4 * eager.norm()


def test_a_batch_of_another_shape_is_refused_after_capture(tmp_path):
    from repro.graphs import GraphedTrainStep

    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).cuda()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def eager_step(x, y, lr):
        loss = torch.nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach().double(), loss.detach().double()])

    step = GraphedTrainStep(network, optimizer, torch.autocast("cuda", enabled=False), eager_step, eager_steps=1)
    x, y = torch.randn(8, 12, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    step(x, y, 0.1)  # eager
    step(x, y, 0.1)  # captured and replayed
    with pytest.raises(ValueError, match=r"captured for batches of \(8, 12\) images"):
        step(x[:5], y[:5], 0.1)
