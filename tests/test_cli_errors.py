"""Every command against every kind of bad input it can receive: one ``error:`` line, exit
status 1, no traceback, nothing left behind.

Each case runs a command in a fresh process (``python scripts/<command>.py``, the code behind
``protoad <command>``) with a bad file, folder or flag, and asserts:
  * exit status 1 and no ``Traceback`` on stderr;
  * exactly one stderr line starting with ``error: ``, which names the bad file (or flag) and
    says what to do (the case lists words the line must contain);
  * no file written (folders may be made) and no input changed.
``python -m pytest tests/test_cli_errors.py -s`` prints the matrix: command, case, error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from protoad_jax import Config, Model, export_scorer, weights
from protoad_jax.datasets import demo

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet50"  # layer1..3 as wide as wide_resnet50_2's (1792 channels), a quarter the bytes


@dataclasses.dataclass(frozen=True)
class Case:
    """``command`` run with ``args`` (``{name}`` filled from the fixture's paths) must fail with
    one line containing every string of ``says``."""

    command: str
    name: str
    args: tuple[str, ...]
    says: tuple[str, ...]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, made once: weights, a model, an export, images, datasets, files of
    every wrong kind. The cases only read them."""
    d = tmp_path_factory.mktemp("inputs")
    f: dict[str, Path] = {"root": d}
    variables = weights.random_variables(ARCH)
    f["weights"] = weights.save_variables(d / "weights.npz", variables)
    wide = weights.random_variables("wide_resnet50_2")
    f["wide_weights"] = weights.save_variables(d / "wide.npz", wide)
    protos = np.random.default_rng(0).normal(size=(6, 1792)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    config = Config(arch=ARCH, image_size=64, resize=72, num_prototypes=6)
    f["model"] = Model(protos, config, str(f["weights"])).save(d / "model.npz")
    f["model_other_arch"] = Model(protos, config, str(f["wide_weights"])).save(d / "other_arch.npz")
    f["model_no_weights"] = Model(protos, config, None).save(d / "random_model.npz")
    f["export"] = export_scorer(Model(protos, config, str(f["weights"])),
                                weights.load_backbone(f["weights"], ARCH), d / "exported")
    good = bytes(f["model"].read_bytes())
    for name, data in {"empty.npz": b"", "truncated.npz": good[: len(good) // 2],
                       "text.npz": b"not an npz file\n"}.items():
        (d / name).write_bytes(data)
        f[name.split(".")[0]] = d / name
    png = d / "images" / "a.png"
    png.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 96, 3), np.uint8)).save(png)
    f["images"] = png.parent
    f["png"] = png
    f["empty_dir"] = d / "empty_dir"
    f["empty_dir"].mkdir()
    (d / "no_images").mkdir()
    (d / "no_images" / "notes.txt").write_text("no image here")
    f["no_images"] = d / "no_images"
    (d / "corrupt").mkdir()
    (d / "corrupt" / "broken.png").write_bytes(png.read_bytes()[:60])
    f["corrupt"] = d / "corrupt"
    (d / "not_export").mkdir()
    (d / "not_export" / "keep.txt").write_text("a user's file")
    f["not_export"] = d / "not_export"
    f["a_file"] = d / "a_file.txt"
    f["a_file"].write_text("x")
    for name, edit in {
        "export_truncated": lambda e: (e / "scorer.jaxexport").write_bytes(
            (e / "scorer.jaxexport").read_bytes()[:1000]),
        "export_bad_json": lambda e: (e / "manifest.json").write_text("{not json"),
        "export_bad_config": lambda e: (e / "manifest.json").write_text(json.dumps(
            {**json.loads((e / "manifest.json").read_text()), "config": {"bogus": 1}})),
        "export_no_weights": lambda e: (e / "weights.npz").unlink(),
        "export_edited_weights": lambda e: (e / "weights.npz").write_bytes(
            (e / "weights.npz").read_bytes()[:-10] + b"0123456789"),
    }.items():
        shutil.copytree(f["export"], d / name)
        edit(d / name)
        f[name] = d / name
    # Datasets: a good one, one whose mask has another size, empty training folders.
    mv = demo.make_demo_dataset(d / "mvtec", seed=3, n_train=2, n_test_good=1, n_test_bad=1, size=80)
    f["mvtec"] = mv
    bad_mask = d / "mask_size"
    shutil.copytree(mv, bad_mask)
    mask = next((bad_mask / "demo_object" / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(mask)
    f["mask_size"] = bad_mask
    (d / "folder_no_train" / "train").mkdir(parents=True)
    (d / "folder_no_train" / "test" / "good").mkdir(parents=True)
    f["folder_no_train"] = d / "folder_no_train"
    # Checkpoints: a resnet50 .pth, truncated and wrong-architecture ones.
    pth = d / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), pth)
    f["pth"] = pth
    (d / "truncated.pth").write_bytes(pth.read_bytes()[: pth.stat().st_size // 3])
    f["truncated_pth"] = d / "truncated.pth"
    f["closed_port_url"] = f"http://127.0.0.1:{_closed_port()}/w.pth"
    return f


def _closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M, E, WIDE = "--model={model}", "--exported={export}", "--weights={wide_weights}"
CASES = [
    # predict: model files
    Case("predict", "model missing", ("--model={root}/nope.npz", "--input={images}", "--output_dir={out}"),
         ("nope.npz", "does not exist")),
    Case("predict", "model empty", ("--model={empty}", "--input={images}", "--output_dir={out}"),
         ("empty.npz", "re-create it")),
    Case("predict", "model truncated", ("--model={truncated}", "--input={images}", "--output_dir={out}"),
         ("truncated.npz", "truncated")),
    Case("predict", "model of another format", ("--model={png}", "--input={images}", "--output_dir={out}"),
         ("a.png", "not an .npz")),
    Case("predict", "weights given as model", ("--model={weights}", "--input={images}", "--output_dir={out}"),
         ("weights.npz", "not a protoad_jax model file")),
    Case("predict", "model given as weights", (M, "--weights={model}", "--input={images}", "--output_dir={out}"),
         ("model.npz", "does not match resnet50", "convert-weights")),
    Case("predict", "weights not an npz", (M, "--weights={text}", "--input={images}", "--output_dir={out}"),
         ("text.npz", "not a readable .npz")),
    Case("predict", "weights missing", (M, "--weights={root}/none.npz", "--input={images}", "--output_dir={out}"),
         ("none.npz", "no weights file")),
    Case("predict", "weights of another architecture", ("--model={model_other_arch}", "--input={images}",
                                                         "--output_dir={out}"),
         ("wide.npz", "does not match resnet50")),
    Case("predict", "model without weights", ("--model={model_no_weights}", "--input={images}",
                                              "--output_dir={out}"),
         ("random-init backbone", "--allow_random_weights")),
    # predict: inputs and flags
    Case("predict", "input missing", (M, "--input={root}/nothing", "--output_dir={out}"),
         ("nothing", "does not exist")),
    Case("predict", "input folder empty", (M, "--input={empty_dir}", "--output_dir={out}"),
         ("empty_dir", "no images")),
    Case("predict", "input folder without images", (M, "--input={no_images}", "--output_dir={out}"),
         ("no_images", "no images")),
    Case("predict", "input image corrupt", (M, "--input={corrupt}", "--output_dir={out}"),
         ("broken.png", "cannot decode", "--skip_bad_images")),
    Case("predict", "calibration folder empty", (M, "--input={images}", "--calibrate_dir={empty_dir}",
                                                 "--output_dir={out}"),
         ("empty_dir", "no images")),
    Case("predict", "batch size 0", (M, "--input={images}", "--output_dir={out}", "--batch_size=0"),
         ("--batch_size",)),
    Case("predict", "quantile above 1", (M, "--input={images}", "--output_dir={out}",
                                         "--calibrate_quantile=2"),
         ("--calibrate_quantile",)),
    Case("predict", "model and export both", (M, E, "--input={images}", "--output_dir={out}"),
         ("exactly one of",)),
    # predict: exported scorers
    Case("predict", "export missing", ("--exported={root}/no_export", "--input={images}", "--output_dir={out}"),
         ("no_export", "does not exist")),
    Case("predict", "export truncated", ("--exported={export_truncated}", "--input={images}",
                                         "--output_dir={out}"),
         ("scorer.jaxexport", "truncated or replaced", "re-export")),
    Case("predict", "export manifest not json", ("--exported={export_bad_json}", "--input={images}",
                                                 "--output_dir={out}"),
         ("manifest.json", "not readable JSON")),
    Case("predict", "export manifest config edited", ("--exported={export_bad_config}", "--input={images}",
                                                      "--output_dir={out}"),
         ("config", "re-export")),
    Case("predict", "export weights missing", ("--exported={export_no_weights}", "--input={images}",
                                               "--output_dir={out}"),
         ("weights.npz", "missing")),
    Case("predict", "export weights edited", ("--exported={export_edited_weights}", "--input={images}",
                                              "--output_dir={out}"),
         ("weights.npz", "sha256")),
    Case("predict", "model folder given as export", ("--exported={images}", "--input={images}",
                                                     "--output_dir={out}"),
         ("manifest.json", "is missing")),
    # export
    Case("export", "model missing", ("--model={root}/nope.npz", "--output={out}/exp"),
         ("nope.npz", "does not exist")),
    Case("export", "model truncated", ("--model={truncated}", "--output={out}/exp"),
         ("truncated.npz", "truncated")),
    Case("export", "weights given as model", ("--model={weights}", "--output={out}/exp"),
         ("weights.npz", "not a protoad_jax model file")),
    Case("export", "weights missing", (M, "--weights={root}/none.npz", "--output={out}/exp"),
         ("none.npz", "no weights file")),
    Case("export", "into a non-empty folder", (M, "--output={not_export}"),
         ("not_export", "refusing")),
    Case("export", "onto a file", (M, "--output={a_file}"), ("a_file.txt", "not a directory")),
    Case("export", "unknown platform", (M, "--output={out}/exp", "--platforms=gpu"), ("platforms", "gpu")),
    Case("export", "batch size 0", (M, "--output={out}/exp", "--batch_size=0"), ("--batch_size",)),
    # evaluate
    Case("evaluate", "data folder missing", ("--data_dir={root}/nodata", WIDE,
                                             "--output_dir={out}"),
         ("nodata", "does not exist")),
    Case("evaluate", "data folder empty", ("--data_dir={empty_dir}", WIDE,
                                           "--output_dir={out}"),
         ("empty_dir", "no category folders")),
    Case("evaluate", "unknown category", ("--data_dir={mvtec}", "--categories=bottle", WIDE,
                                          "--output_dir={out}"),
         ("bottle", "not found")),
    Case("evaluate", "folder without training images", ("--dataset=folder", "--data_dir={folder_no_train}",
                                                        WIDE, "--output_dir={out}"),
         ("no training images",)),
    Case("evaluate", "mask of another size", ("--data_dir={mask_size}", "--categories=demo_object",
                                              WIDE, "--output_dir={out}"),
         ("_mask.png", "a mask must have its image's size")),
    Case("evaluate", "weights not an npz", ("--data_dir={mvtec}", "--weights={text}", "--output_dir={out}"),
         ("text.npz", "not a readable .npz")),
    Case("evaluate", "weights missing", ("--data_dir={mvtec}", "--weights={root}/none.npz",
                                         "--output_dir={out}"),
         ("none.npz", "no weights file")),
    Case("evaluate", "max_patches not a number", ("--data_dir={mvtec}", WIDE,
                                                  "--max_patches=many", "--output_dir={out}"),
         ("--max_patches", "many")),
    Case("evaluate", "negative K", ("--data_dir={mvtec}", WIDE, "--num_prototypes=-1", "--output_dir={out}"),
         ("--num_prototypes",)),
    Case("evaluate", "no data_dir", ("--output_dir={out}",), ("--data_dir",)),
    # convert-weights
    Case("convert_weights", "source missing", ("--source={root}/none.pth", "--output={out}/w.npz"),
         ("none.pth", "no such file")),
    Case("convert_weights", "source empty", ("--source={empty}", "--output={out}/w.npz"),
         ("empty.npz",)),
    Case("convert_weights", "source truncated", ("--source={truncated_pth}", "--output={out}/w.npz"),
         ("truncated.pth",)),
    Case("convert_weights", "source of another format", ("--source={png}", "--output={out}/w.npz"),
         ("a.png",)),
    Case("convert_weights", "source of another architecture", ("--source={pth}", "--output={out}/w.npz"),
         ("resnet50.pth", "looks like resnet50")),
    Case("convert_weights", "output not .npz", ("--source={pth}", "--arch=resnet50", "--output={out}/w.txt"),
         ("w.txt", ".npz")),
    Case("convert_weights", "download refused", ("--source={closed_port_url}", "--output={out}/w.npz",
                                                  "--cache_dir={out}/cache"),
         ("could not download", "--source=")),
    # compare-reference
    Case("compare_reference", "model missing", ("--pth={pth}", "--model={root}/nope.npz", "--images={images}"),
         ("nope.npz", "does not exist")),
    Case("compare_reference", "checkpoint truncated", ("--pth={truncated_pth}", M, "--images={images}"),
         ("truncated.pth",)),
    # update
    Case("update", "model missing", ("--model={root}/nope.npz", "--add_normal={images}",
                                     "--output={out}/m2.npz"), ("nope.npz", "does not exist")),
    Case("update", "model without coverage level (older file)",
         ("--model={model}", "--add_normal={images}", "--output={out}/m2.npz"), ("model.npz", "refit")),
    Case("update", "no images", ("--model={model}", "--add_normal={no_images}", "--output={out}/m2.npz"),
         ("no_images", "no images")),
    Case("update", "output is the model", ("--model={model}", "--add_normal={images}", "--output={model}"),
         ("model.npz", "never overwritten")),
    Case("compare_reference", "no images", ("--pth={pth}", M, "--images={empty_dir}"),
         ("empty_dir", "no images")),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_case(case: Case, paths: dict[str, object], out: Path,
             repo: Path = REPO) -> subprocess.CompletedProcess:
    """Runs ``case`` with its paths filled in, in a fresh process of this checkout."""
    args = [a.format(**paths, out=out) for a in case.args]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, str(repo / "scripts" / f"{case.command}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}:{c.name}" for c in CASES])
def test_bad_input_is_one_error_line(case, files, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(files["root"])
    res = run_case(case, files, out)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    print(f"{case.command:18s} {case.name:34s} {errors[-1] if errors else res.stderr[-300:]}")
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert len(errors) == 1, res.stderr[-3000:]
    for word in case.says:
        assert word in errors[0], (word, errors[0])
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not left, left
    assert _snapshot(files["root"]) == before, "an input was changed"


def test_every_command_is_covered():
    """The matrix covers each command of ``protoad`` (and so each script)."""
    from protoad_jax import cli

    assert {c.command for c in CASES} == set(cli.COMMANDS.values())


def test_protoad_entry_point_dispatches_and_refuses_unknown_commands(files, tmp_path):
    """``protoad <command>`` runs the same code as the script; an unknown command is one line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = "import sys; from protoad_jax import cli; sys.argv[0] = 'protoad'; cli.main()"
    bad = subprocess.run([sys.executable, "-c", code, "evaluat"], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown command 'evaluat'"), bad.stderr
    res = subprocess.run([sys.executable, "-c", code, "predict", f"--model={files['root']}/nope.npz",
                          f"--input={files['images']}", f"--output_dir={tmp_path}/o"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert "nope.npz does not exist" in errors[0]


def test_protoad_is_an_installed_console_command():
    """``pip install`` gives the ``protoad`` command (pyproject's [project.scripts])."""
    import importlib.metadata

    found = importlib.metadata.entry_points(group="console_scripts", name="protoad")
    assert [e.value for e in found] == ["protoad_jax.cli:main"], list(found)
