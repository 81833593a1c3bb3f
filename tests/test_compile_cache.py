"""The commands' compiled-program cache (protoad_jax.compile_cache): which folder is used (the
flag, $PROTOAD_COMPILE_CACHE_DIR, XDG_CACHE_HOME, ~/.cache; empty turns it off), that
``predict`` writes the compiled scoring region there on a first run and reads it back on the
second (no new entries), in --model and --exported mode, and that an unusable folder is one
error naming the flag. No timing: scripts/benchmarks/startup.py measures the start-up.

A random ``resnet50`` at 64 x 64 with K = 6 keeps each command run to a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from protoad_jax import Config, Model, compile_cache, export, scoring, weights
from protoad_jax.errors import SettingsError

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet50"


# ----------------------------------------------------------------------------- which folder


@pytest.fixture
def clean_env(monkeypatch):
    for name in (compile_cache.ENV_VAR, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cache_dir_precedence(clean_env, tmp_path):
    home = Path.home()
    assert compile_cache.cache_dir() == home / ".cache" / "protoad_jax" / "compiled"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "protoad_jax" / "compiled"
    clean_env.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.cache_dir() == tmp_path / "env"
    assert compile_cache.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert compile_cache.cache_dir("") is None  # the flag turns it off, whatever the environment
    clean_env.setenv(compile_cache.ENV_VAR, "")
    assert compile_cache.cache_dir() is None
    assert compile_cache.cache_dir(tmp_path / "flag") == tmp_path / "flag"


@pytest.fixture
def restore_jax_cache_config():
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)


def test_enable_sets_jax_and_refuses_unusable_folders(clean_env, restore_jax_cache_config, tmp_path):
    assert compile_cache.enable(tmp_path / "c") == tmp_path / "c"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c" / compile_cache.JAX_SUBDIR)
    assert (tmp_path / "c" / compile_cache.JAX_SUBDIR).is_dir()
    # JAX's default (1 s) skips the scoring region, which compiles in under a second.
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_enable_compilation_cache
    assert compile_cache.enable("") is None and not jax.config.jax_enable_compilation_cache
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SettingsError, match=f"{blocker}.*cannot be used"):
        compile_cache.enable(blocker / "cache")
    clean_env.setenv(compile_cache.ENV_VAR, str(blocker / "cache"))
    with pytest.raises(SettingsError, match=compile_cache.ENV_VAR):
        compile_cache.enable()
    # The default folder, not chosen by the user: a warning and no cache, not an error.
    clean_env.delenv(compile_cache.ENV_VAR)
    clean_env.setenv("XDG_CACHE_HOME", str(blocker))
    jax.config.update("jax_compilation_cache_dir", None)  # as in a process without JAX's own
    assert compile_cache.enable() is None and not jax.config.jax_enable_compilation_cache
    assert not (blocker.parent / "protoad_jax").exists()


def test_enable_keeps_jax_s_own_folder(clean_env, restore_jax_cache_config, tmp_path):
    """A user who set JAX_COMPILATION_CACHE_DIR (and none of ours) keeps it."""
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert compile_cache.enable() == tmp_path / "xdg" / "protoad_jax" / "compiled"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert compile_cache.enable(tmp_path / "flag") == tmp_path / "flag"  # the flag wins
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag" / compile_cache.JAX_SUBDIR)


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cc")
    w = weights.save_variables(root / "rn50.npz", weights.random_variables(ARCH))
    protos = np.asarray(scoring.prepare_prototypes(np.random.default_rng(0).normal(size=(6, 1792)), True))
    model = Model(protos, Config(arch=ARCH, image_size=64, resize=72, num_prototypes=6), str(w))
    model_path = model.save(root / "model.npz")
    exported = export.export_scorer(model, weights.load_backbone(w, ARCH), root / "exported")
    image = root / "one.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 80, 3), np.uint8)).save(image)
    return {"model": model_path, "exported": exported, "image": image, "root": root}


def _predict(files: dict[str, Path], out: Path, *args: str, env: dict[str, str] | None = None):
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), f"--input={files['image']}",
                          f"--output_dir={out}", "--noprogress", *args],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    print(res.stdout[-2000:], res.stderr[-2000:])
    return res


def _entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (folder / compile_cache.JAX_SUBDIR).glob("*-cache")}


@pytest.mark.parametrize("mode", ["model", "exported"])
def test_predict_writes_then_reads_the_cache(files, tmp_path, mode):
    cache = tmp_path / "cache"
    source = f"--model={files['model']}" if mode == "model" else f"--exported={files['exported']}"
    first = _predict(files, tmp_path / "o1", source, f"--compile_cache_dir={cache}")
    assert first.returncode == 0
    written = _entries(cache)
    # jit_fn: the scoring region (make_scorer's); jit_call: the exported artifact's call.
    region = "jit_fn-" if mode == "model" else "jit_call-"
    assert any(name.startswith(region) for name in written), sorted(written)
    second = _predict(files, tmp_path / "o2", source, f"--compile_cache_dir={cache}")
    assert second.returncode == 0
    assert _entries(cache) == written  # every program came from the cache: nothing new written
    a = (tmp_path / "o1" / "predictions.csv").read_text()
    assert a == (tmp_path / "o2" / "predictions.csv").read_text()


def test_predict_cache_folder_from_env_or_off(files, tmp_path):
    env = dict(os.environ, **{compile_cache.ENV_VAR: str(tmp_path / "env")})
    assert _predict(files, tmp_path / "o1", f"--model={files['model']}", env=env).returncode == 0
    assert any(n.startswith("jit_fn-") for n in _entries(tmp_path / "env"))
    # --compile_cache_dir= turns it off: nothing written anywhere, the environment's folder unused.
    env = dict(os.environ, **{compile_cache.ENV_VAR: str(tmp_path / "env2")},
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    res = _predict(files, tmp_path / "o2", f"--model={files['model']}", "--compile_cache_dir=", env=env)
    assert res.returncode == 0
    assert not (tmp_path / "env2").exists() and not (tmp_path / "xdg").exists()


def test_predict_unusable_cache_folder_is_one_error_line(files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = _predict(files, tmp_path / "o", f"--model={files['model']}",
                   f"--compile_cache_dir={blocker / 'c'}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error: ") and str(blocker) in lines[-1]
    assert "--compile_cache_dir=" in lines[-1]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the measurement


def test_startup_breakdown_charges_each_instant_once():
    """scripts/benchmarks/startup.py's exclusive breakdown against a sampled timeline: each
    instant goes to the active span of highest priority, the latest started among equals."""
    sys.path.append(str(REPO / "scripts" / "benchmarks"))
    import startup

    rng = np.random.default_rng(0)
    labels = list(startup.COLUMNS[1:-1])
    spans = []
    for _ in range(40):
        a = float(rng.uniform(0, 10))
        spans.append((str(rng.choice(labels)), a, a + float(rng.exponential(1.0)), int(rng.integers(1, 3))))
    got = startup._exclusive(spans, 1.0, 9.0)
    t = np.linspace(1.0, 9.0, 200_001)[:-1] + 4e-5 / 2  # sample midpoints of 8 / 200,000 s steps
    want = dict.fromkeys(startup.COLUMNS, 0.0)
    for ti in t:
        active = [s for s in spans if s[1] <= ti < s[2]]
        best = max(active, key=lambda s: (s[3], s[1]))[0] if active else "other"
        want[best] += 8.0 / len(t)
    err = max(abs(got[k] - want[k]) for k in want)
    print("max |exclusive - sampled| s:", err, "(tolerance 1e-3: the sampling step times the boundaries)")
    assert abs(sum(got.values()) - 8.0) < 1e-9
    assert err < 1e-3, (got, want)
