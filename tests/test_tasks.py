"""Task specs: the shipped world tasks, user folder tasks (DreamBooth layout, imagefolder + metadata.jsonl), and the
errors a user gets for bad folders, images, captions and YAML."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from dopsd_bench.errors import TaskError, UnknownNameError
from dopsd_bench.tasks import load_task
from dopsd_bench.world import render as R


# ---- the shipped world tasks ----------------------------------------------------------------------------------
def test_builtin_specs():
    concept, style = load_task("concept"), load_task("style")
    assert (concept.family, concept.source, list(concept.instances)) == ("concept", "world",
                                                                          ["zorb", "kwel", "fenx", "drup"])
    assert (style.family, list(style.instances), style.default_instance) == ("style", ["dotted", "checkered"],
                                                                             "dotted")
    for spec in (concept, style):
        assert spec.n_train == 8 and len(spec.eval_seeds) == spec.n_samples
        assert len(spec.retention_seeds) == spec.n_retention
        assert all(inst.token == name for name, inst in spec.instances.items())  # world: token = instance name


def test_world_build_is_consistent():
    spec = load_task("style")
    data = spec.build("checkered", seed=0)
    assert data.task == "style" and data.family == "style" and data.instance == "checkered"
    assert data.token == "checkered" and data.source == "world"
    assert data.train_images.shape == (8, 3, R.RES, R.RES)
    assert data.train_images.min() >= -1 and data.train_images.max() <= 1
    assert len(data.train_captions) == 8 and all("checkered" in c for c in data.train_captions)
    assert len(data.eval_prompts) == len(data.eval_seeds) == len(data.eval_targets) == spec.n_samples
    assert all("checkered" in p for p in data.eval_prompts)
    assert all(t["style"] == "checkered" for t in data.eval_targets)
    n = spec.n_retention
    assert len(data.retention_prompts) == len(data.retention_seeds) == len(data.retention_targets) == n
    assert data.retention_real.shape == (n, 3, R.RES, R.RES)
    assert not any(s in p for p in data.retention_prompts for s in R.HELD_OUT_STYLES)


def test_world_eval_data_is_fixed_and_train_set_follows_the_seed():
    spec = load_task("concept")
    a, b = spec.build("zorb", seed=0), spec.build("zorb", seed=1)
    assert a.eval_prompts == b.eval_prompts and a.eval_seeds == b.eval_seeds  # same evaluation for every run
    assert a.retention_prompts == b.retention_prompts
    assert torch.equal(a.retention_real, b.retention_real)
    assert not torch.equal(a.train_images, b.train_images)  # the run seed draws the training renders
    assert torch.equal(a.train_images, spec.build("zorb", seed=0).train_images)
    # what `plan` sizes the text by: the captions the run trains on, without building the rest
    assert spec.training_captions("zorb", seed=1) == b.train_captions != a.train_captions


def test_world_build_resizes():
    data = load_task("concept").build("kwel", seed=0, resolution=48)
    assert data.train_images.shape[-2:] == (48, 48) and data.retention_real.shape[-2:] == (48, 48)


def test_unknown_names():
    with pytest.raises(UnknownNameError, match=r"did you mean 'style'\?.*valid: .*concept.*style"):
        load_task("stlye")
    with pytest.raises(UnknownNameError, match="did you mean 'kwel'"):
        load_task("concept").build("kwell")
    with pytest.raises(TaskError, match="does not exist"):
        load_task("no/such/task.yaml")


# ---- YAML validation ------------------------------------------------------------------------------------------
def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


WORLD = """
    family: style
    source: world
    instances: [dotted]
    eval_prompts: {count: 2}
    retention_prompts: {count: 2}
"""


def test_world_yaml_defaults(tmp_path):
    spec = load_task(write_yaml(tmp_path / "mini.yaml", WORLD))
    assert spec.name == "mini" and spec.n_samples == 2 and spec.eval_seeds == [0, 1] and spec.n_train == 8
    assert spec.retention_seeds == [100_000, 100_001]


@pytest.mark.parametrize(("change", "error"), [
    ("family: colour", "unknown family 'colour'"),
    ("source: web", "unknown source 'web'"),
    ("instances: [dotty]", "did you mean 'dotted'"),
    ("n_sample: 4", "did you mean 'n_samples'"),
    ("eval_seeds: [0, 1, 1]", "repeats a seed"),
    ("eval_seeds: {range: [0, 5]}", "eval_seeds has 5 seeds but n_samples is 2"),
    ("n_train: 0", "n_train must be a positive integer"),
])
def test_world_yaml_errors(tmp_path, change, error):
    key = change.split(":")[0]
    lines = [line for line in textwrap.dedent(WORLD).splitlines() if not line.startswith(key + ":")]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines + [change]) + "\n")
    with pytest.raises((TaskError, UnknownNameError), match=error):
        load_task(path)


def test_invalid_yaml_file(tmp_path):
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(write_yaml(tmp_path / "t.yaml", "family: [unclosed\n"))
    with pytest.raises(TaskError, match="missing required key `instances`"):
        load_task(write_yaml(tmp_path / "u.yaml", "family: style\nsource: world\n"))


# ---- user folders ---------------------------------------------------------------------------------------------
def make_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i % 256, 100, 200)).save(folder / name)


FOLDER = """
    family: concept
    source: folder
    instances:
      dog:
        path: dog
        token: sks
        class: dog
        prompt: "a photo of {token} {class}"
    eval_prompts: ["a {token} {class} on the beach", "a {token} {class} in the snow"]
    retention_prompts: ["a photo of a cat", "a red car"]
    n_samples: 4
    n_retention: 3
"""


def test_dreambooth_folder(tmp_path):
    make_images(tmp_path / "dog", ["b.png", "a.jpg", "c.png"])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    spec = load_task(write_yaml(tmp_path / "dog.yaml", FOLDER))
    spec.check()
    data = spec.build(resolution=16)
    assert data.source == "folder" and data.token == "sks" and data.instance == "dog"
    assert data.train_images.shape == (3, 3, 16, 16)
    assert data.train_images.min() >= -1 and data.train_images.max() <= 1
    assert data.train_captions == ["a photo of sks dog"] * 3
    assert data.eval_prompts == ["a sks dog on the beach", "a sks dog in the snow"] * 2
    assert data.eval_seeds == [0, 1, 2, 3]
    assert data.retention_prompts == ["a photo of a cat", "a red car", "a photo of a cat"]
    assert data.eval_targets is None and data.retention_real is None


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "dog"
    make_images(folder, ["x.png", "sub/y.png"])
    rows = [{"file_name": "sub/y.png", "text": "sks dog asleep"}, {"file_name": "x.png", "text": "sks dog running"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = FOLDER.replace('        prompt: "a photo of {token} {class}"\n', "")
    data = load_task(write_yaml(tmp_path / "dog.yaml", text)).build(resolution=8)
    assert data.train_captions == ["sks dog asleep", "sks dog running"]  # sorted by file name
    assert load_task(tmp_path / "dog.yaml").training_captions() == data.train_captions
    assert data.train_images.shape == (2, 3, 8, 8)


def test_corrupt_image_is_named(tmp_path):
    make_images(tmp_path / "dog", ["a.png", "b.png"])
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    spec = load_task(write_yaml(tmp_path / "dog.yaml", FOLDER))
    with pytest.raises(TaskError, match=f"cannot read image {bad}"):
        spec.check()
    with pytest.raises(TaskError, match="broken.png"):
        spec.build(resolution=8)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(TaskError, match=r"image folder .*dog does not exist"):
        load_task(write_yaml(tmp_path / "dog.yaml", FOLDER))
    (tmp_path / "dog").mkdir()
    spec = load_task(tmp_path / "dog.yaml")
    with pytest.raises(TaskError, match="no images in"):
        spec.check()


@pytest.mark.parametrize(("rows", "error"), [
    ([{"file_name": "x.png", "text": "t"}, {"file_name": "gone.png", "text": "t"}], "not in .*: gone.png"),
    ([{"file_name": "x.png", "text": "t"}], "images without a caption .*: y.png"),
    ([{"file_name": "x.png"}], "needs string keys"),
])
def test_metadata_caption_mismatch(tmp_path, rows, error):
    make_images(tmp_path / "dog", ["x.png", "y.png"])
    (tmp_path / "dog" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = load_task(write_yaml(tmp_path / "dog.yaml", FOLDER))
    with pytest.raises(TaskError, match=error):
        spec.check()


def test_folder_yaml_errors(tmp_path):
    make_images(tmp_path / "dog", ["x.png"])
    with pytest.raises(TaskError, match="unknown placeholder {subject}"):
        load_task(write_yaml(tmp_path / "a.yaml", FOLDER.replace("{class} on the beach", "{subject}")))
    with pytest.raises(TaskError, match="mentions the token"):
        load_task(write_yaml(tmp_path / "b.yaml", FOLDER.replace("a red car", "a sks car")))
    with pytest.raises(TaskError, match="needs a caption template"):
        load_task(write_yaml(tmp_path / "c.yaml", FOLDER.replace('prompt: "a photo of {token} {class}"',
                                                                 "token: sks"))).check()
    with pytest.raises(TaskError, match="n_train is 5 but .* has 1 images"):
        load_task(write_yaml(tmp_path / "d.yaml", FOLDER + "    n_train: 5\n")).check()


def test_readme_task_example_loads(tmp_path):
    """The folder task shown in README.md is valid as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    make_images(tmp_path / "images" / "dog", [f"{i}.png" for i in range(5)])
    make_images(tmp_path / "images" / "cat", [f"{i}.png" for i in range(5)])
    rows = [json.dumps({"file_name": f"{i}.png", "text": f"a photo of zwx cat {i}"}) for i in range(5)]
    (tmp_path / "images" / "cat" / "metadata.jsonl").write_text("\n".join(rows))
    spec = load_task(write_yaml(tmp_path / "mine.yaml", text))
    assert list(spec.instances) == ["dog", "cat"]
    cat = spec.build("cat", resolution=8)
    assert cat.train_captions[0] == "a photo of zwx cat 0" and cat.eval_prompts[0] == "a zwx cat on the beach"
    assert len(spec.build("dog", resolution=8).train_captions) == 5


def test_files_that_are_not_utf8_are_named_not_a_traceback(tmp_path):
    bad = tmp_path / "latin.yaml"
    bad.write_bytes("family: concept\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin.yaml is not UTF-8 text .*save it as UTF-8"):
        load_task(bad)
    make_images(tmp_path / "images" / "cat", ["0.png", "1.png"])
    (tmp_path / "images" / "cat" / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "text": "a \xe9 cat"}\n')
    task = write_yaml(tmp_path / "cat.yaml", """
        family: concept
        source: folder
        instances:
          cat: {path: images/cat, token: zwx}
        eval_prompts: ["a {token} cat"]
        retention_prompts: ["a bowl of fruit"]
    """)
    with pytest.raises(TaskError, match=r"metadata.jsonl is not UTF-8 text"):
        load_task(task).check()


def test_an_evaluation_prompt_without_the_token_is_refused(tmp_path):
    make_images(tmp_path / "images" / "dog", ["0.png", "1.png"])
    task = write_yaml(tmp_path / "dog.yaml", """
        family: concept
        source: folder
        instances:
          dog: {path: images/dog, token: sks, prompt: "a photo of {token} dog"}
        eval_prompts: ["a {token} dog on the beach", "a dog in the snow"]
        retention_prompts: ["a bowl of fruit"]
    """)
    with pytest.raises(TaskError, match="'a dog in the snow' names neither {token} nor 'sks'"):
        load_task(task).check()
