"""Every number this project compares against, read from He et al. 2015 (arXiv:1512.03385).

This is the one place paper values live; each carries the table or figure it comes from.
Errors are percentages; FLOPs are multiply-adds (the paper's convention, and fvcore's).
"""

# Table 6: CIFAR-10 test error (%) of the ResNets (option A shortcuts).
TABLE6_TEST_ERROR = {
    "cifar_resnet20": 8.75,
    "cifar_resnet32": 7.51,
    "cifar_resnet44": 7.17,
    "cifar_resnet56": 6.97,
    "cifar_resnet110": 6.61,  # mean of 5 runs; the best of the 5 was 6.43
    "cifar_resnet1202": 7.93,
}
# Table 6: ResNet-110 is the one row printed as mean +- std over 5 runs, with the best run beside it;
# every other CIFAR-10 (and ImageNet) number of the paper is one run.
TABLE6_RESNET110_STD = 0.16
TABLE6_RESNET110_BEST = 6.43
TABLE6_RESNET110_RUNS = 5

# Table 6: parameter counts, printed rounded to 0.01M.
TABLE6_PARAMS = {
    "cifar_resnet20": 0.27e6,
    "cifar_resnet32": 0.46e6,
    "cifar_resnet44": 0.66e6,
    "cifar_resnet56": 0.85e6,
    "cifar_resnet110": 1.7e6,
    "cifar_resnet1202": 19.4e6,
}

# Table 2: ImageNet top-1 error (%), 10-crop testing on the validation set, option A shortcuts.
TABLE2_TOP1_ERROR = {
    "imagenet_plain18": 27.94,
    "imagenet_resnet18": 27.88,
    "imagenet_plain34": 28.54,
    "imagenet_resnet34": 25.03,
}

# Table 3: ImageNet 10-crop top-1 / top-5 error (%); used beside Table 2 for the top-5 column.
# Keyed by our spec names: Table 3's "ResNet-34 A" is imagenet_resnet34, Table 2's option-A ResNet-34.
TABLE3_TOP1_TOP5_ERROR = {
    "vgg16": (28.07, 9.33),
    "imagenet_plain34": (28.54, 10.02),
    "imagenet_resnet34": (25.03, 7.76),
    "imagenet_resnet34_B": (24.52, 7.46),
    "imagenet_resnet34_C": (24.19, 7.40),
    "imagenet_resnet50": (22.85, 6.71),
    "imagenet_resnet101": (21.75, 6.05),
    "imagenet_resnet152": (21.43, 5.71),
}

# Table 4: ImageNet top-1 / top-5 error (%) of single models on the validation set, with the fully-
# convolutional multi-scale test of Sec. 3.4 (shorter sides {224, 256, 384, 480, 640}). Keyed by our
# spec names, as Table 3. Checked against arXiv:1512.03385 Table 4; ../shared/PAPER.md lacks this table.
TABLE4_TOP1_TOP5_ERROR = {
    "imagenet_resnet34_B": (21.84, 5.71),
    "imagenet_resnet34_C": (21.53, 5.60),
    "imagenet_resnet50": (20.74, 5.25),
    "imagenet_resnet101": (19.87, 4.60),
    "imagenet_resnet152": (19.38, 4.49),
}
# Sec. 3.4: the shorter sides of Table 4's test.
TABLE4_SCALES = (224, 256, 384, 480, 640)

# Multiply-adds at 224x224 as (value, where the paper prints it). Table 1 gives the ResNets;
# Section 3.3 gives plain-34 (3.6e9, same as ResNet-34) and VGG-19; Section 4.1 gives VGG-16.
IMAGENET_FLOPS = {
    "imagenet_plain34": (3.6e9, "Sec. 3.3"),
    "imagenet_resnet18": (1.8e9, "Table 1"),
    "imagenet_resnet34": (3.6e9, "Table 1"),
    "imagenet_resnet50": (3.8e9, "Table 1"),
    "imagenet_resnet101": (7.6e9, "Table 1"),
    "imagenet_resnet152": (11.3e9, "Table 1"),
    "vgg16": (15.3e9, "Sec. 4.1"),
    "vgg19": (19.6e9, "Sec. 3.3"),
}

# Section 4.2 / Table 6: CIFAR-10 networks have depth 6n+2.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)

# Section 4.2: the CIFAR-10 schedule, in iterations at batch 128.
CIFAR_LR_MILESTONES = (32_000, 48_000)
CIFAR_MAX_ITERS = 64_000
