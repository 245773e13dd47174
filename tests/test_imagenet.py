"""The ImageNet setting on a tiny generated ImageFolder."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import models
from runs import ROOT, SMALL
from swalp import errors
from swalp.data import datasets, loaders

CLASSES = ("n01440764", "n01443537")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """train/ (4 images per class) and val/ (2 per class) of small JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                height, width = rng.integers(40, 90, size=2)
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(folder / f"{name}_{index}.JPEG")
    return root


def test_imagenet_folders_load_with_the_standard_augmentation(imagenet_root):
    train_set, val_set, classes = datasets.load_data("ImageNet", str(imagenet_root))
    assert classes == 2 and train_set.classes == list(CLASSES) and (len(train_set), len(val_set)) == (8, 4)
    image, label = train_set[0]
    assert image.shape == (3, 224, 224) and label == 0
    # Validation: resize 256, centre crop 224, deterministic.
    assert torch.equal(val_set[1][0], val_set[1][0])
    seeded = loaders.SeededAugmentation(train_set, seed=3)
    first = seeded[5][0]
    assert torch.equal(first, seeded[5][0])
    seeded.set_epoch(1)
    assert not torch.equal(first, seeded[5][0])  # random resized crops and flips change per epoch


def test_resnet18_is_torchvisions_with_quantizer_sites():
    import torchvision

    net = models.build_model("ResNet18", num_classes=1000)
    reference = torchvision.models.resnet18()
    assert [name for name, _ in net.named_parameters()] == [name for name, _ in reference.named_parameters()]
    assert len(net.quantizer_sites("layer")) == 20 and net.fc not in net.quantizer_sites("layer")
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_eight_bit_resnet18_on_imagenet_end_to_end(train_fast, imagenet_root, tmp_path):
    run_dir = tmp_path / "imagenet"
    result = train_fast("--dataset", "ImageNet", "--data_path", imagenet_root, "--model", "ResNet18",
                       "--epochs", 2, "--swa_start", 1, "--wl-weight", 8, "--wl-grad", 8, "--wl-activate", 8,
                       "--wl-error", 8, "--wl-momentum", 8, "--batch_size", 4, "--num_workers", 0, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["activation_quantizers"] == 20
    assert results["config"]["lr_init"] == 0.1 and results["config"]["wd"] == 1e-4  # ImageNet's defaults
    assert all(record["test_samples"] == 4 for record in results["epochs"])
    checkpoint = torch.load(run_dir / "checkpoint-2.pt", weights_only=True)
    assert checkpoint["model_state"]["fc.weight"].shape == (2, 512)


def test_missing_imagenet_folders(train_fast, tmp_path):
    result = train_fast("--dataset", "ImageNet", "--data_path", tmp_path, "--model", "ResNet18", "--dir",
                       tmp_path / "run", *SMALL)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ImageNet needs class folders of images under") and \
        len(result.stderr.strip().splitlines()) == 1


def test_a_cifar_model_on_imagenet_is_refused(train_fast, tmp_path):
    result = train_fast("--dataset", "ImageNet", "--data_path", tmp_path, "--model", "VGG16")
    assert result.returncode == 2 and "--model VGG16 is for CIFAR; use ResNet18" in result.stderr


def test_example_imagenet_sh_runs_through_torchrun(fake_cifar_env, imagenet_root, tmp_path):
    run_dir = tmp_path / "example"
    env = dict(fake_cifar_env, DATA_PATH=str(imagenet_root), NPROC="2", OMP_NUM_THREADS="1")
    with open(os.path.join(ROOT, "example_imagenet.sh")) as handle:
        example = next(line[1:].split() for line in handle if line.startswith("#   bash example_imagenet.sh "))
    # The header's example, with a batch the tiny images allow and the test's own directory.
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "example_imagenet.sh"), *example[2:], "--batch_size", "2", "--num_workers", "0",
         "--dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert config["model"] == "ResNet18" and config["dataset"] == "ImageNet" and config["wl_acc"] == 8
    assert torch.load(run_dir / "checkpoint-1.pt", weights_only=True)["world_size"] == 2


def test_train_and_val_class_folders_must_match(imagenet_root, tmp_path):
    import shutil

    shutil.copytree(imagenet_root, tmp_path / "copy")
    (tmp_path / "copy" / "val" / CLASSES[1]).rename(tmp_path / "copy" / "val" / "n99999999")
    with pytest.raises(errors.UserError, match="class folders of .* differ"):
        datasets.load_data("ImageNet", str(tmp_path / "copy"))
