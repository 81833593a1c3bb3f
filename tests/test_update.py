"""update(): prototypes appended for the uncovered patches (NumPy oracle), old ones unchanged,
deterministic, recalibrated; bad input (older models, NaN features, nothing to add).

A random resnet50 at 64 x 64, K = 12 prototypes fitted on crops of one scikit-learn sample
photo (china), normal images of the other (flower) added; the images have several sizes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from protoad_jax import Config, InputError, SettingsError, load_model, pipeline, update, weights

REPO = Path(__file__).resolve().parents[1]
CONFIG = Config(arch="resnet50", image_size=64, resize=72, num_prototypes=12, max_patches=600)
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    china, flower = load_sample_images().images

    def save(img, name, boxes):
        out = []
        for i, (y, x, h, w) in enumerate(boxes):
            out.append(d / name / f"{i}.png")
            out[-1].parent.mkdir(exist_ok=True)
            Image.fromarray(img[y:y + h, x:x + w]).save(out[-1])
        return out

    train = save(china, "china", [(0, 0, 300, 400), (100, 200, 250, 250), (20, 300, 400, 300)])
    calib = save(china, "china_calib", [(120, 40, 280, 300), (0, 150, 330, 330)])
    new = save(flower, "flower", [(40, 60, 320, 300), (0, 200, 200, 420)])  # other sizes
    variables = weights.random_variables("resnet50")
    fit = pipeline.fit(train, config=CONFIG, variables=variables, progress=False)
    return train, calib, new, variables, fit


def test_prototypes_appended_old_ones_unchanged_deterministic(setup):
    _, _, new, variables, fit = setup
    a = update.update(fit, new, variables, progress=False, source="flower")
    b = update.update(fit, new, variables, progress=False, source="flower")
    k = fit.num_prototypes
    assert a.added >= 1 and a.model.num_prototypes == k + a.added
    np.testing.assert_array_equal(a.model.prototypes[:k], fit.prototypes)
    np.testing.assert_array_equal(a.model.prototypes, b.model.prototypes)  # deterministic
    for name in ("paths", "rows", "cols", "boxes", "cosines"):
        np.testing.assert_array_equal(getattr(a.model.exemplars, name)[:k],
                                      getattr(fit.exemplars, name))
    assert set(a.model.exemplars.paths[k:]) <= {str(p) for p in new}
    assert a.model.updates == (a.record,) and fit.updates == ()
    assert a.record["images"] == 2 and a.record["level"] == fit.coverage["level"]
    print(a.line())


def test_uncovered_patches_and_prototype_count_match_numpy(setup):
    _, _, new, variables, fit = setup
    res = update.update(fit, new, variables, progress=False)
    patches = pipeline.extract_patches(new, variables, CONFIG, progress=False)
    best = (patches.astype(np.float64) @ fit.prototypes.astype(np.float64).T).max(axis=1)
    level = fit.coverage["level"]
    clear = np.abs(best - level) > TOL  # patches at the level within rounding may go either way
    oracle = best < level
    lo, hi = int((oracle & clear).sum()), int((oracle | ~clear).sum())
    print(f"uncovered: {res.record['uncovered']} (oracle {lo}..{hi} of {len(best)})")
    assert lo <= res.record["uncovered"] <= hi
    # The count: the fit's density, doubled until the added prototypes cover all but 1% of the
    # uncovered patches (NumPy oracle of that coverage on the final prototypes).
    n, k, u = fit.coverage["num_patches"], fit.coverage["num_prototypes"], res.record["uncovered"]
    counts = [min(u, math.ceil(u * k / n) * 2 ** i) for i in range(20)]
    assert res.added in counts
    sub = patches[best < level] if lo == hi else None
    if sub is not None:
        added = res.model.prototypes[fit.num_prototypes:].astype(np.float64)
        left = np.mean((sub.astype(np.float64) @ added.T).max(axis=1) < level)
        print(f"{res.added} prototypes added; uncovered patches they leave: {left:.4f}")
        assert left <= 0.01 + TOL or res.added == u


def test_threshold_recalibrated_on_the_calibration_record(setup):
    _, calib, new, variables, fit = setup
    scores = pipeline.score_images(fit, calib, variables, progress=False).scores
    calibrated = fit.with_threshold(float(np.quantile(scores, 0.9)), "test",
                                    {"quantile": 0.9, "paths": [str(p) for p in calib]})
    res = update.update(calibrated, new, variables, progress=False)
    after = pipeline.score_images(res.model, calib, variables, progress=False).scores
    want = float(np.quantile(after.astype(np.float64), 0.9))
    print(f"threshold {calibrated.threshold:.6f} -> {res.model.threshold:.6f} (oracle {want:.6f})")
    assert abs(res.model.threshold - want) <= 1e-7
    assert res.record["threshold_after"] == res.model.threshold
    assert res.model.calibration == calibrated.calibration


def test_nothing_to_add_leaves_the_model_unchanged(setup):
    _, _, new, variables, fit = setup
    everything_covered = dataclasses.replace(fit, coverage=dict(fit.coverage, level=-2.0))
    res = update.update(everything_covered, new, variables, progress=False)
    assert res.model is everything_covered and res.added == 0 and res.record["uncovered"] == 0
    assert "nothing added" in res.line()


def test_bad_input(setup):
    _, _, new, variables, fit = setup
    with pytest.raises(update.UpdateError, match="refit"):
        update.update(dataclasses.replace(fit, coverage=None, exemplars=None), new, variables)
    with pytest.raises(SettingsError, match="no images"):
        update.update(fit, [], variables)
    nan = jax.tree.map(lambda x: np.full_like(x, np.nan), variables)
    with pytest.raises(update.UpdateError, match="NaN or inf.*flower"):
        update.update(fit, new, nan, progress=False)
    assert issubclass(update.UpdateError, InputError)


def test_command_writes_nothing_when_nothing_is_added(setup, tmp_path):
    _, _, new, variables, fit = setup
    w = weights.save_variables(tmp_path / "w.npz", variables)
    model = dataclasses.replace(fit, weights=str(w), coverage=dict(fit.coverage, level=-2.0))
    src = model.save(tmp_path / "m.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "update.py"), f"--model={src}",
                          f"--add_normal={new[0].parent}", f"--output={tmp_path / 'm2.npz'}",
                          "--noprogress"], check=False, capture_output=True, text=True, env=env, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "nothing added" in res.stdout and "not written" in res.stdout
    assert not (tmp_path / "m2.npz").exists()
    assert load_model(src).num_prototypes == fit.num_prototypes
