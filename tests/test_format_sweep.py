"""The format sweep of the convex experiments, at small size."""

import json

import pytest

from experiments import format_sweep, logistic_regression


@pytest.fixture(scope="module")
def sweep():
    digits = logistic_regression.load_data("/nonexistent")
    return format_sweep.run(("fixed8", "mxfp8", "mxfp8-ceil"), epochs=20, swa_start=10, replicates=4, seed=0,
                            data=digits)


def test_swalp_beats_sgd_lp_and_the_floor_mx_scale_traps_the_weights(sweep):
    assert sweep["formats"] == ["fixed8.4", "mxfp8e4m3", "mxfp8e4m3-ceil"]  # 4 integer bits on the digits
    excess = {key: [loss - sweep["optimum_loss"] for loss in sweep[key]["loss"]] for key in ("sgd_lp", "swalp")}
    for i in (0, 2):
        assert excess["swalp"][i] < 0.85 * excess["sgd_lp"][i], sweep["formats"][i]
    # With the spec's floor scale a weight cannot grow past 1.75 x 2^k in small steps.
    assert excess["sgd_lp"][1] > 5 * excess["sgd_lp"][2]


def test_sweep_main_prints_plots_and_refuses_bad_formats(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    result, rows = format_sweep.main(["--formats", "E5M2", "mxint8", "NVFP4", "--epochs", "2", "--swa_start", "1",
                                      "--replicates", "2", "--data_path", str(tmp_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "e5m2" in printed and "nvfp4" in printed and "SWALP loss" in printed
    assert [row["format"] for row in rows] == ["e5m2", "mxint8", "nvfp4", "float32", "optimum"]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.with_suffix(".json").read_text())["table"][1]["SWALP loss"] == result["swalp"]["loss"][1]
    for bad in ("fp32", "mxfp9"):
        with pytest.raises(SystemExit) as exit_info:
            format_sweep.main(["--formats", bad, "--out", str(out)])
        assert exit_info.value.code == 2
