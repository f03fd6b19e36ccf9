"""The arguments of `repro evaluate`, `repro table4`, `repro finetune` and `repro predict`. Nothing heavy is imported here
(the CLI builds its parser from it); each command imports its module when it runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from repro.arguments import MAX_WORKERS, at_least, device, grid_file, output_folder, path, seed
from repro.reuse import PROTOCOLS, STRATEGIES


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=path, metavar="RUN_FOLDER",
                        help="a finished run folder (RESULTS/runs/<name>/seed<K>)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ten_crop",
                        help="center crop, the 10-crop test of Tables 2-3, or Table 4's multi-scale test of "
                             "Sec. 3.4 (default ten_crop)")
    parser.add_argument("--data", help="the data root it trained on (default: its data.root, then $REPRO_DATA)")
    parser.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--workers", type=at_least(0, MAX_WORKERS), default=4, help="data-loader processes (default 4)")
    parser.add_argument("--max-batch-pixels", type=at_least(1),
                        help="multi_scale: pixels in one forward pass, which bounds its memory "
                             "(default 8 x 640 x 640)")


def run_evaluate(args: argparse.Namespace) -> int:
    from repro.reuse.evaluate import MAX_BATCH_PIXELS, evaluate_run

    path, record = evaluate_run(args.run, args.protocol, data=args.data, device=args.device, workers=args.workers,
                                max_batch_pixels=args.max_batch_pixels or MAX_BATCH_PIXELS)
    print(f"{args.protocol}: top-1 error {record['top1_error']:.2f}%, top-5 error {record['top5_error']:.2f}% "
          f"on {record['images']:,} images")
    print(path)
    return 0


def add_table4_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=path, default="results",
                        help="results folder holding runs/ (default: results)")
    parser.add_argument("--suite", default="experiments/suite.yaml", help="the suite whose Table 4 networks to test")
    parser.add_argument("--data", help="the ImageNet root they trained on (default: each run's data.root, then "
                                       "$REPRO_DATA)")
    parser.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--workers", type=at_least(0, MAX_WORKERS), default=4, help="data-loader processes (default 4)")


def run_table4(args: argparse.Namespace) -> int:
    from repro.reuse.evaluate import evaluate_table4

    for run, record in evaluate_table4(args.results, args.suite, data=args.data, device=args.device,
                                       workers=args.workers):
        print(f"{run}: multi-scale top-1 error {record['top1_error']:.2f}%, top-5 error "
              f"{record['top5_error']:.2f}% on {record['images']:,} images")
    return 0


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="a finished ImageNet run folder, or a torchvision ResNet weights file (.pth) on disk")
    parser.add_argument("--data", required=True, help="dataset folder: DIR/train/<class>/ and DIR/val/<class>/")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="head: the new FC layer; last_stage: conv5_x and the FC layer; all: every layer at "
                             "a lower learning rate (default head; the recipe is experiments/finetune/<strategy>.yaml)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="keep every BN layer's statistics and affine parameters fixed (FrozenBatchNorm2d)")
    parser.add_argument("--source-data", help="run sources: the ImageNet root they trained on, for their mean image "
                                              "(default: their data.root, then $REPRO_DATA/imagenet)")
    parser.add_argument("--spec", help="recipe file (default: experiments/finetune/<strategy>.yaml)")
    parser.add_argument("--name", help="run name (default: ft-<source>-<dataset>-<strategy>[-frozenbn])")
    parser.add_argument("--seed", type=seed, default=0, help="seeds the new head, the data order and augmentation")
    parser.add_argument("--results", type=output_folder, default="results", help="results folder (default: results)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set optim.max_iters=3000 (repeatable)")
    parser.add_argument("--restart", action="store_true", help="start over, keeping the old run folder aside")


def run_finetune(args: argparse.Namespace) -> int:
    from repro.engine import train
    from repro.reuse.finetune import finetune_spec

    spec = finetune_spec(args.source, args.data, strategy=args.strategy, freeze_bn=args.freeze_bn,
                         spec_file=args.spec, name=args.name, seed=args.seed, source_data=args.source_data,
                         assignments=args.set)
    return train(spec, Path(args.results), None, restart=args.restart)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="run", type=path, required=True, metavar="RUN_FOLDER", help="a run folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them")
    parser.add_argument("--top", type=at_least(1), default=5, help="classes per image (default 5)")
    parser.add_argument("--grid", type=grid_file, metavar="PNG",
                        help="also save a grid of the images with guesses and true labels (.png, .jpg, .pdf or .svg)")
    parser.add_argument("--data", help="ImageNet runs: the data root they trained on, for the mean image and the "
                                       "class names (default: data.root, then $REPRO_DATA)")
    parser.add_argument("--device", type=device, default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")


def run_predict(args: argparse.Namespace) -> int:
    from repro.reuse.predict import predict, save_grid, table

    predictions = predict(args.run, args.images, top=args.top, data=args.data, device=args.device)
    print(table(predictions))
    if args.grid:
        print(save_grid(predictions, args.grid))
    return 0
