"""--dataset digits: scikit-learn's digits as a CIFAR-like data set, and SWALP learning on it."""

import json

import numpy as np
import pytest
import torch

import train
from experiments import digits_quickstart
from swalp.data import datasets, digits
from swalp.run import arguments


def test_digits_look_like_torchvisions_cifar():
    train_set, test_set, classes = datasets.load_data("digits", None)
    assert classes == 10 and train_set.classes == [str(digit) for digit in range(10)]
    assert train_set.data.shape == (1347, 32, 32, 3) and test_set.data.shape == (450, 32, 32, 3)
    assert train_set.data.dtype == np.uint8 and train_set.data.max() == 255
    assert all(type(target) is int for target in train_set.targets)
    assert (train_set.data[..., 0] == train_set.data[..., 2]).all()  # grey in three channels
    # Stratified: every class a quarter in the test split; and fixed.
    counts_train, counts_test = np.bincount(train_set.targets), np.bincount(test_set.targets)
    assert (np.abs(counts_test / (counts_train + counts_test) - 0.25) < 0.01).all()
    assert np.array_equal(digits.Digits(train=False).data, test_set.data)
    image, target = train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == train_set.targets[0]
    assert abs(float(torch.stack([test_set[i][0] for i in range(200)]).mean())) < 0.3  # normalised


def test_an_8_bit_swalp_run_on_digits_learns(tmp_path, capsys):
    """A short run in the paper's 8-bit setting, through the quick start:
    far better than chance (90 % error), and the average not worse than SGD
    beyond the noise of 450 test images."""
    # The batched loader: the per-sample one costs a third of this run's time.
    errors = digits_quickstart.main(["--precisions", "lp8", "--seeds", "1", "--out", str(tmp_path), "--",
                                     "--epochs", "3", "--swa_start", "2", "--loader", "batched"])
    sgd, swa = errors[("lp8", 1)]["sgd_error"], errors[("lp8", 1)]["swa_error"]
    assert swa < 50, (sgd, swa)
    assert swa <= sgd + 3, (sgd, swa)
    results = json.loads((tmp_path / "lp8" / "seed1" / "results.json").read_text())
    assert results["config"]["wl_acc"] == 8 and results["swa_n"] == 2
    printed = capsys.readouterr().out
    assert "| seed 1 " in printed and "SWALP" in printed


def test_digits_need_no_data_path_and_have_their_own_defaults(capsys):
    args = train.parse_args(["--dataset", "digits", "--model", "PreResNet20"])
    assert args.data_path is None
    defaults = arguments.DATASET_DEFAULTS["digits"]
    assert {key: getattr(args, key) for key in defaults} == defaults
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--dataset", "CIFAR10", "--model", "VGG16"])
    assert stopped.value.code == 2 and "--dataset CIFAR10 needs --data_path" in capsys.readouterr().err


def test_the_quick_start_table_gives_mean_and_spread_over_seeds():
    errors = {(precision, seed): {"sgd_error": 10.0 + seed, "swa_error": 5.0 + 2 * seed}
              for precision in ("fp", "lp8") for seed in (1, 2, 3)}
    last = digits_quickstart.table(errors).splitlines()[-1]
    assert last.startswith("| mean ± std of 3") and last.count("12.00 ± 1.00") == 2 and "9.00 ± 2.00" in last
