"""The convex experiments (experiments/) at small size: the paper's claims,
checked on the numbers the experiments compute."""

import json
import math
import struct

import pytest
import torch

from experiments import common, linear_regression, logistic_regression


@pytest.fixture(scope="module")
def linear():
    """30 000 iterations of the three methods, 32 replicates (about 3 s)."""
    result = linear_regression.run(iterations=30_000, swa_start=2000, replicates=32, seed=0)
    result["late"] = result["iterations"][-1] / 2
    return result


def test_linear_regression_swalp_distance_falls_like_one_over_t(linear):
    for fl in linear["fractional_lengths"]:
        slope = linear_regression.loglog_slope(linear["swa_iterations"], linear["swalp"][fl], linear["late"])
        # -1 in theory; the burn-in before averaging steepens it a little.
        assert -1.5 < slope < -0.7, (fl, slope)


def test_linear_regression_low_precision_sgd_stalls_at_a_floor_set_by_the_step(linear):
    ts, late = linear["iterations"], linear["late"]
    floors = []
    for fl in linear["fractional_lengths"]:
        slope = linear_regression.loglog_slope(ts, linear["sgd_lp"][fl], late)
        assert abs(slope) < 0.3, (fl, slope)
        floors.append(linear_regression.late_mean(ts, linear["sgd_lp"][fl], late))
    # Two fractional bits fewer: a 4 times larger step, and a floor at least that much higher.
    assert linear["fractional_lengths"] == [4, 6, 8]
    assert floors[0] > 4 * floors[1] > 16 * floors[2], floors
    assert floors[0] > 50 * floors[2], floors


def test_linear_regression_swalp_goes_below_the_grid_and_sgd_lp(linear):
    for fl in linear["fractional_lengths"]:
        swalp = linear["swalp"][fl][-1]
        # The nearest fixed-point vector to w* is farther from it than SWALP's average.
        assert swalp < linear["grid"][fl], fl
        assert swalp < linear["sgd_lp"][fl][-1] / 20, fl


def test_linear_regression_full_precision_sgd_converges_to_a_lower_floor(linear):
    ts, late = linear["iterations"], linear["late"]
    floor = linear_regression.late_mean(ts, linear["sgd_fp"], late)
    assert floor < 1e-4 * linear["initial"]
    # Constant-rate SGD stops at its own gradient-noise floor, below every quantized one.
    assert abs(linear_regression.loglog_slope(ts, linear["sgd_fp"], late)) < 0.3
    for fl in linear["fractional_lengths"]:
        assert floor < linear_regression.late_mean(ts, linear["sgd_lp"][fl], late) / 3, fl


def test_linear_regression_is_repeatable():
    def small(seed):
        return linear_regression.run(fractional_lengths=(6,), iterations=600, swa_start=100, replicates=2, seed=seed)

    first, again, other = small(1), small(1), small(2)
    assert first["swalp"] == again["swalp"] and first["sgd_lp"] == again["sgd_lp"]
    assert first["swalp"] != other["swalp"]


def test_loglog_slope_and_checkpoints():
    ts = linear_regression.checkpoints(10_000, 10)
    assert ts[0] == 1 and ts[-1] == 10_000 and {10, 100, 1000} <= set(ts)
    assert linear_regression.loglog_slope(ts, [3 / t for t in ts], 100) == pytest.approx(-1)
    assert linear_regression.loglog_slope(ts, [2.0 for _ in ts], 100) == pytest.approx(0)


@pytest.fixture(scope="module")
def digits():
    return logistic_regression.load_data("/nonexistent")


@pytest.fixture(scope="module")
def logistic(digits):
    """4, 8 and 16 bits on the digits, 30 epochs, 8 replicates (about 2 s)."""
    return logistic_regression.run(word_lengths=(4, 8, 16), epochs=30, swa_start=15, replicates=8, seed=0, data=digits)


def test_digits_are_the_fallback(digits):
    x_train, _, x_test, _, name = digits
    assert name.startswith("digits") and len(x_train) + len(x_test) == 1797
    assert x_train.shape[1] == 65 and torch.all(x_train[:, -1] == 1)
    assert x_train[:, :-1].pow(2).sum(1).mean().item() == pytest.approx(1, rel=1e-5)


def excess(logistic, key):
    losses = logistic[key]["loss"]
    best = logistic["optimum_loss"]
    return [v - best for v in losses] if isinstance(losses, list) else losses - best


def test_logistic_regression_swalp_settles_in_a_smaller_noise_ball(logistic):
    sgd_lp, swalp, sgd_fp = excess(logistic, "sgd_lp"), excess(logistic, "swalp"), excess(logistic, "sgd_fp")
    assert min(sgd_lp + swalp) > -1e-9  # the L-BFGS optimum is the optimum
    # 4 and 8 bits: SWALP's training loss is lower and closer to full precision.
    for i in (0, 1):
        assert swalp[i] < 0.75 * sgd_lp[i], logistic["word_lengths"][i]
        assert abs(swalp[i] - sgd_fp) < abs(sgd_lp[i] - sgd_fp)
    # The noise ball shrinks with the word length; at 16 bits SGD-LP is SGD-FP.
    assert sgd_lp[0] > 5 * sgd_lp[1] > 5 * sgd_lp[2]
    assert abs(sgd_lp[2] - sgd_fp) < 0.1 * sgd_fp
    # Averaging also cancels the gradient noise: SWA-FP and 16-bit SWALP beat SGD-FP.
    assert excess(logistic, "swa_fp") < sgd_fp / 2 and swalp[2] < sgd_fp / 2
    assert logistic["swalp"]["test_error"][0] < logistic["sgd_lp"]["test_error"][0]


def test_logistic_regression_weights_lie_on_the_fixed_point_grid(digits):
    x, y = digits[0][:200], digits[1][:200]
    w, swa = logistic_regression.train(x, y, [4, 8], il=3, lr=2.0, wd=3e-4, epochs=2, batch_size=16, swa_start=1,
                                       replicates=2, seed=0)
    for i, fl in ((1, 1), (2, 5)):
        scaled = w[i] * 2 ** fl
        assert torch.equal(scaled, scaled.round()) and w[i].min() >= -4 and w[i].max() < 4
        assert not torch.equal(swa[i] * 2 ** fl, (swa[i] * 2 ** fl).round())  # the average is full precision
    assert not torch.equal(w[0] * 2 ** 5, (w[0] * 2 ** 5).round())


def test_integer_bits_are_the_fewest_that_hold_the_weights():
    for largest, bits in ((0.3, 0), (0.9, 1), (1.0, 2), (1.5, 2), (2.0, 3), (5.0, 4)):
        il = logistic_regression.integer_bits(torch.tensor([0.1, -largest]))
        assert il == bits, largest
        assert largest < 2 ** (il - 1) and largest >= 2 ** (il - 2)


def test_logistic_regression_is_repeatable(digits):
    def small(seed):
        return logistic_regression.run(word_lengths=(6,), epochs=2, swa_start=1, replicates=2, seed=seed, data=digits)

    assert small(3) == small(3)
    assert small(3)["swalp"] != small(4)["swalp"]


def write_idx(path, array, magic):
    with open(path, "wb") as handle:
        handle.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape))
        handle.write(array.numpy().tobytes())


def test_mnist_is_used_when_present(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", 50), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte",
                  torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8), 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.arange(count, dtype=torch.uint8) % 10, 0x801)
    x_train, _, x_test, y_test, name = logistic_regression.load_data(str(tmp_path))
    assert name == "MNIST"
    assert x_train.shape == (50, 785) and x_test.shape == (20, 785) and y_test.tolist() == list(range(10)) * 2
    assert x_train[:, :-1].pow(2).sum(1).mean().item() == pytest.approx(1, rel=1e-5)


def test_logistic_regression_main_writes_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "results" / "logistic.png"
    result, rows = logistic_regression.main(["--data_path", str(tmp_path), "--epochs", "2", "--swa_start", "1",
                                             "--wl", "4", "8", "--replicates", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "digits" in printed and "SWA loss" in printed and "float32" in printed
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["table"] == json.loads(json.dumps(rows)) and saved["result"]["word_lengths"] == [4, 8]
    assert [row["wl"] for row in rows] == [4, 8, "float32", "optimum"]
    assert rows[0]["SGD loss"] == result["sgd_lp"]["loss"][0] and math.isfinite(rows[1]["SWA loss"])


def test_linear_regression_table_and_plot(tmp_path):
    result = linear_regression.run(fractional_lengths=(4, 8), iterations=1000, swa_start=100, replicates=2)
    rows = linear_regression.summary(result)
    assert [(row["method"], row["fl"]) for row in rows] == [("SGD-FP", None), ("SGD-LP", 4), ("SWALP", 4),
                                                            ("SGD-LP", 8), ("SWALP", 8)]
    assert rows[2]["T=1e+03"] == result["swalp"][4][-1] and rows[1]["nearest grid point"] == result["grid"][4]
    path = tmp_path / "linear.png"
    json_path = common.save(linear_regression.plot(result), str(path), {"table": rows})
    assert path.read_bytes()[:4] == b"\x89PNG"
    with open(json_path) as handle:
        assert json.load(handle)["table"][0]["method"] == "SGD-FP"
