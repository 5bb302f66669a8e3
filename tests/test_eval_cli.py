"""`python -m phased_dmd_mp.evaluate` on point samples, plugged-in extractors and bad input."""

import functools
import json
import math

import numpy as np
import pytest
from cli_helpers import run_cli

from phased_dmd_mp import evaluate
from phased_dmd_mp.eval import extractors
from phased_dmd_mp.eval.digits import DigitsExtractor, DigitsNet

MEANS = [[4.0 * math.cos(a), 4.0 * math.sin(a)] for a in np.linspace(0, 2 * np.pi, 9)[:-1]]
MIXTURE = {"mixture_means": np.array(MEANS), "mixture_weights": np.full(8, 1 / 8)}


def _points(modes, n, seed, std=0.1):
    """n points spread evenly over the given modes, Gaussian noise around their means."""
    means = np.array(MEANS)[list(modes)]
    noise = std * np.random.default_rng(seed).standard_normal((n, 2))
    return means[np.arange(n) % len(means)] + noise


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


_run = functools.partial(run_cli, evaluate.main)  # (exit code, stderr)


def test_point_samples_end_to_end(tmp_path, capsys):
    spec = {**MIXTURE, "mixture_std": np.float64(0.1)}
    # Two runs of a model that covers all 8 modes, one of a model that drops half of them.
    files = [
        _save(
            tmp_path / f"full{seed}.npz",
            samples=_points(range(8), 800, seed)[None],
            model="full",
            **spec,
        )
        for seed in (0, 1)
    ]
    files.append(
        _save(tmp_path / "half.npz", samples=_points(range(4), 800, 2)[None], model="half", **spec)
    )
    out = tmp_path / "out"
    code, err = _run([*files, "--out", str(out), "--set", "mixture_reference_samples=2000"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    full, half = ({k: v["mean"] for k, v in row["metrics"].items()} for row in results["models"])
    assert [row["runs"] for row in results["models"]] == [2, 1]
    assert results["models"][0]["metrics"]["mode_coverage"]["ci95"] == 0  # both runs cover all
    assert results["models"][1]["metrics"]["recall"]["ci95"] is None
    assert full["mode_coverage"] == 1 and half["mode_coverage"] == 0.5
    # Half the modes get twice their weight (minus the ~1% off-mode), half get none.
    assert full["mass_error_max"] < 0.01 and half["mass_error_max"] == pytest.approx(0.125)
    assert half["mass_error_mean"] == pytest.approx(0.125, abs=0.005)
    assert full["on_mode_fraction"] > 0.97 and half["on_mode_fraction"] > 0.97
    assert full["recall"] > 0.85 and half["recall"] < 0.6
    assert full["frechet_distance"] < 0.1 < half["frechet_distance"]
    assert full["perceptual_distance"] > half["perceptual_distance"]  # euclidean spread
    assert len(results["runs"][2]["mode_fractions"]) == 8
    assert results["reference"]["samples"] == 2000 and results["reference"]["std"] == 0.1
    assert "| half | 1 | 1 x 800 |" in (out / "results.md").read_text()
    assert (out / "grids" / "full.png").is_file() and (out / "grids" / "half.png").is_file()
    # Results are not overwritten without --overwrite.
    code, err = _run([*files, "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err


def test_mixture_from_the_config(tmp_path, capsys):
    path = _save(tmp_path / "run.npz", samples=_points(range(8), 200, 0).reshape(4, 50, 2))
    config = tmp_path / "mixture.yaml"
    config.write_text(
        f"mixture_means: {MEANS}\nmixture_weights: {[1] * 8}\nmixture_std: 0.1\n"
        "mixture_reference_samples: 500\n"
    )
    out = tmp_path / "out"
    code, err = _run([path, "--out", str(out), "--config", str(config)], capsys)
    assert code == 0, err
    row = json.loads((out / "results.json").read_text())["models"][0]
    assert row["model"] == "run" and row["metrics"]["mode_coverage"]["mean"] == 1


PLUGIN = '''
import torch

class Pixels:
    """Gray 4x4 average-pooled pixels as features, mean absolute difference as distance."""
    name = "pixels"
    def features(self, images):
        gray = images.mean(dim=1, keepdim=True)
        return torch.nn.functional.adaptive_avg_pool2d(gray, 4).flatten(1)
    def distance(self, a, b):
        return (a - b).abs().flatten(1).mean(1)

class Flat(Pixels):
    """Flattened pixels: the feature size depends on the image size."""
    def features(self, images):
        return images.flatten(1)
'''


def test_plugged_in_extractor(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3, 16, 16)).astype(np.float32)
    path = _save(tmp_path / "rgb.npz", samples=images, labels=np.array(["a", "b", "c"]))
    out = tmp_path / "out"
    plug = ["--set", "features=my_metrics:Pixels", "--set", "perceptual=my_metrics:Pixels"]
    code, err = _run([path, "--out", str(out), *plug, "--set", "knn_k=2"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["features"] == {"name": "pixels"} and results["perceptual"] == {"name": "pixels"}
    # Uniform noise: mean |a - b| of two U(-1, 1) draws is 2/3.
    distance = results["models"][0]["metrics"]["perceptual_distance"]["mean"]
    assert distance == pytest.approx(2 / 3, abs=0.01)
    assert (out / "grids" / "rgb.png").is_file()
    # Features whose size depends on the image size cannot be compared with the reference.
    plug = ["--set", "features=my_metrics:Flat", "--set", "perceptual=my_metrics:Pixels"]
    code, err = _run([path, "--out", str(tmp_path / "flat"), *plug], capsys)
    assert code == 2 and "768 features per sample, the reference 64" in err, err


def test_images_without_an_extractor_are_refused(tmp_path, capsys):
    """A video model's RGB frames are not digits: the automatic extractor would score them
    against the digits anyway (random RGB noise got FD 1808 and exit 0)."""
    rgb = np.random.default_rng(0).uniform(-1, 1, (2, 4, 3, 16, 16))
    path = _save(tmp_path / "rgb.npz", samples=rgb)
    code, err = _run([path, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not the 8x8 gray digits" in err and "features=module:factory" in err
    assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()
    # naming the digits extractor is a choice: it resizes and averages to gray, as documented
    code, err = _run([path, "--out", str(tmp_path / "explicit"), "--set", "features=digits",
                      "--set", "perceptual=digits"], capsys)
    assert code == 0, err


POINTS = {"samples": np.zeros((2, 4, 2))}
IMAGES = {"samples": np.zeros((2, 4, 1, 8, 8))}


@pytest.mark.parametrize(
    "arrays, extra, message",
    [
        ({"sample": np.zeros((2, 4, 2))}, [], "unknown keys ['sample']"),
        ({"labels": np.arange(2)}, [], "missing the key 'samples'"),
        ({"samples": np.zeros((2, 4))}, [], "got shape (2, 4)"),
        ({"samples": np.zeros((2, 1, 2))}, [], "at least 2 seeds"),
        ({"samples": np.full((2, 4, 2), np.nan)}, [], "NaN"),
        ({"samples": np.array([["a", "b"]])}, [], "must be numbers"),
        ({**IMAGES, "labels": np.arange(3)}, [], "labels must be one per condition"),
        ({**IMAGES, "value_range": np.array([1.0, 0.0])}, [], "low < high"),
        ({**IMAGES, "model": np.array(["a", "b"])}, [], "model must be a non-empty string"),
        ({**IMAGES, **MIXTURE, "mixture_std": 0.1}, [], "for point samples"),
        (POINTS, [], "point samples need a mixture"),
        ({**POINTS, **MIXTURE}, [], "give all of"),
        ({**POINTS, **MIXTURE, "mixture_std": -1.0}, [], "std must be > 0"),
        ({**POINTS, **MIXTURE, "mixture_std": 0.1}, ["--set", "knn_k=0"], "knn_k must be >= 1"),
        ({**POINTS, **MIXTURE, "mixture_std": 0.1}, ["--set", "knn=3"], "did you mean 'knn_k'"),
        (
            {**POINTS, **MIXTURE, "mixture_std": 0.1},
            ["--set", "features=nope"],
            "unknown extractor",
        ),
        (
            {**POINTS, **MIXTURE, "mixture_std": 0.1},
            ["--set", "features=builtins:object"],
            "lacks a `name` attribute or a `features` method",
        ),
        (
            {**POINTS, **MIXTURE, "mixture_std": 0.1},
            ["--set", "features=digits"],
            "digits-cnn takes images",
        ),
        ({**POINTS, **MIXTURE, "mixture_std": 0.1}, ["--set", "mixture_std=0.1"], "give all of"),
    ],
)
def test_bad_input_is_a_clean_error(tmp_path, capsys, monkeypatch, arrays, extra, message):
    monkeypatch.setenv("PHASED_DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(extractors.EXTRACTORS, "digits", _untrained_digits)  # no training
    path = _save(tmp_path / "bad.npz", **arrays)
    code, err = _run([path, "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err


def _untrained_digits():
    return DigitsExtractor(DigitsNet(), test_accuracy=0.0)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: None, "file does not exist"),
        (lambda path: path.write_text("not a zip"), "not a readable .npz file"),
    ],
)
def test_unreadable_files(tmp_path, capsys, write, message):
    path = tmp_path / "run.npz"
    write(path)
    code, err = _run([str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_images_and_points_are_not_mixed(tmp_path, capsys):
    points = _save(tmp_path / "p.npz", **POINTS, **MIXTURE, mixture_std=0.1)
    images = _save(tmp_path / "i.npz", **IMAGES)
    code, err = _run([points, images, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "mix images and points" in err


def test_image_models_side_by_side(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    paths = [
        _save(tmp_path / f"{name}.npz", samples=rng.uniform(-1, 1, (3, 4, 1, 8, 8)), model=name)
        for name in ("teacher", "student")
    ]
    out = tmp_path / "out"
    plug = ["--set", "features=my_metrics:Pixels", "--set", "perceptual=my_metrics:Pixels"]
    code, err = _run([*paths, "--out", str(out), *plug, "--set", "knn_k=2"], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(out / "comparison.png") as both, Image.open(out / "grids/teacher.png") as one:
        assert both.width > 1.8 * one.width  # two grids side by side


def test_point_models_side_by_side_four_to_a_row(tmp_path, capsys):
    spec = {**MIXTURE, "mixture_std": np.float64(0.1)}
    files = [
        _save(
            tmp_path / f"m{i}.npz", samples=_points(range(8), 100, i)[None], model=f"m{i}", **spec
        )
        for i in range(5)
    ]
    out = tmp_path / "out"
    code, err = _run([*files, "--out", str(out), "--set", "mixture_reference_samples=200"], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(out / "comparison.png") as all5, Image.open(out / "grids/m0.png") as one:
        # one panel each: four in a row, the fifth in a second row
        assert (all5.width, all5.height) == (4 * one.width, 2 * one.height)
        assert one.size == (400, 445)  # a 3.4-inch scatter with its labels and 2-line title
