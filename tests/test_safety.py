"""Runs that never lose or mix a result: output names safe on any file system, one rule for
temporaries, torchrun's processes that never wait for each other, one guarded open for every file,
a closed stdout, and exit status 2 whenever an error line was printed."""
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import devices
import emerdiff
import evaluate
import files
import runner
from command_line import (EXAMPLE, FAST, OUTPUTS, assert_complete, assert_one_error, cli, priced_calls, save_image,
                          start_cli, torchrun_cli)
from conftest import ROOT
from datasets import EvaluationError, dataset_samples
from inputs import EmerDiffError

# ---- names ----


@pytest.mark.parametrize("stem, name", [
    ("cat", "cat"), ("", "_"), (".", "_."), ("..", "_.."), (".hidden", "_.hidden"),
    (f".x.{files.HOST}.123.tmp", f"_.x.{files.HOST}.123.tmp"), ("summary.json", "_summary.json"),
    ("summary.part0", "_summary.part0"), ("a:b*c?", "a_b_c_"), ("tab\there", "tab_here")])
def test_folder_names_are_safe_and_never_a_runs_own_file(stem, name):
    assert files.folder_name(stem) == name


def test_a_long_name_is_cut_and_keeps_a_hash_of_the_whole():
    a, b = files.folder_name("x" * 249 + "a"), files.folder_name("x" * 249 + "b")
    for name in (a, b):
        temporary = files.temporary_path(Path(name + "-old")).name  # the longest name a run makes of it
        assert len(os.fsencode(temporary)) <= 255
    assert a != b and a.startswith("x" * 100)
    assert files.folder_name("é" * 200) != files.folder_name("é" * 201)  # cut by bytes, not characters


def test_images_with_awkward_names_each_get_their_own_folder(tmp_path, tiny_sd_dir):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    names = ["..jpg", "summary.json.png", f".x.{files.HOST}.{os.getpid()}.tmp.png", "y" * 245 + ".png"]
    for i, name in enumerate(names):
        save_image(images / f"{i}.png", (64, 64), seed=i).rename(images / name)  # Pillow saves by suffix
    args = ["--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST]
    assert runner.main(args) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 4 and all(not p.name.startswith(".") for p in folders)
    for folder in folders:
        assert_complete(folder, (64, 64))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 4
    assert runner.main(args) == 0  # a rerun finds every folder done: none is taken for a temporary and swept
    assert json.loads((out / "summary.json").read_text())["skipped"] == 4


def test_two_images_of_a_dataset_that_would_share_a_folder_are_refused(tmp_path):
    root = tmp_path / "cityscapes"
    for city in ("aachen", "bonn"):  # the same file name in two cities
        name = "same_000000_000001"
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True)
        Image.new("RGB", (8, 4)).save(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png")
        Image.new("L", (8, 4)).save(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
    with pytest.raises(EvaluationError, match="share the output folder same_000000_000001_leftImg8bit: rename one"):
        dataset_samples("cityscapes", root)


# ---- temporaries ----

def test_one_rule_for_temporaries(tmp_path):
    dead = tmp_path / f".x.{files.HOST}.999999999.tmp"  # no process has this id (Linux caps them at 2^22)
    own = tmp_path / f".y.{files.HOST}.{os.getpid()}.tmp"  # this process's number, from an earlier life
    huge = tmp_path / f".z.{files.HOST}.{'9' * 20}.tmp"  # no process id: not ours, left alone
    other_host = tmp_path / ".w.elsewhere.999999999.tmp"
    for path in (dead, own, other_host):
        path.mkdir()
    huge.write_text("")
    link = tmp_path / f".v-old.{files.HOST}.999999999.tmp"  # a link to a folder, renamed aside by --overwrite
    (tmp_path / "kept").mkdir()
    link.symlink_to(tmp_path / "kept")
    files.remove_dead_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([huge.name, other_host.name, "kept"])


def test_overwriting_a_folder_that_is_a_link_leaves_nothing_behind(tmp_path, tiny_sd_dir):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    args = ["--image", str(EXAMPLE), "--weights", str(tiny_sd_dir), *FAST]
    assert runner.main([*args, "--out", str(elsewhere)]) == 0
    out.mkdir()
    (out / "chelsea").symlink_to(elsewhere / "chelsea")
    assert runner.main([*args, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "chelsea").is_symlink() and OUTPUTS <= {p.name for p in (out / "chelsea").iterdir()}
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    assert (elsewhere / "chelsea" / "labels.npy").is_file()  # what the link pointed to is not touched


# ---- reading: one guarded open ----

def test_a_run_record_that_is_a_fifo_or_nested_too_deep_is_no_record(tmp_path):
    fifo, deep = tmp_path / "fifo", tmp_path / "deep"
    fifo.mkdir()
    os.mkfifo(fifo / "run.json")
    deep.mkdir()
    (deep / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import runner; from pathlib import Path; "
            "print(runner.saved_result(Path(sys.argv[2]), {}), runner.saved_result(Path(sys.argv[3]), {}))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(fifo), str(deep)], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == ["None", "None"], result.stderr


@pytest.mark.parametrize("where", ["image", "label map"])
def test_evaluate_refuses_a_fifo_where_an_image_or_a_label_map_should_be(tmp_path, where):
    from test_evaluate import COCO_IDS, make_coco, save_labels
    root = make_coco(tmp_path / "coco")
    for name, (width, height) in COCO_IDS.items():
        save_labels(tmp_path / "pred" / name / "labels.png", [[0] * width] * height, mode="P")
    fifo = (root / "val2017" / "000000000285.jpg" if where == "image"
            else root / "stuffthingmaps_trainval2017" / "val2017" / "000000000285.png")
    fifo.unlink()
    os.mkfifo(fifo)  # read, it would block for ever
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--dataset", "coco-stuff-171", "--root",
                             str(root), "--pred", str(tmp_path / "pred"), "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"evaluate: error: {fifo}: not a regular file (a FIFO, socket or device)\n"


# ---- writing: nothing but a regular file is replaced ----

def test_a_run_replaces_no_fifo_where_its_page_or_summary_goes(tmp_path, capsys):
    """index.html and summary.json of --out each a FIFO (renamed over, it would be a file from then on):
    each said in one line, exit status 2, the FIFOs left as they are, the image's folder written."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("index.html", "summary.json"):
        os.mkfifo(out / name)
    image = save_image(tmp_path / "small.png", (64, 64))
    assert runner.main(["--image", str(image), "--random-weights", "--out", str(out), *FAST]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"emerdiff: error: cannot write {out / name}: not a regular file (a FIFO, socket or device)"
                      for name in ("index.html", "summary.json")]
    assert all(stat.S_ISFIFO(os.stat(out / name).st_mode) for name in ("index.html", "summary.json"))
    assert_complete(out / "small", (64, 64))


def test_evaluate_replaces_no_fifo_or_device_where_its_files_go(tmp_path, capsys):
    """--json a FIFO or a device node (one of /dev/null's numbers, made here: the tests run as root) is
    refused in one line before any scoring (nothing written); summary.scores.json a FIFO is said and left,
    the scores printed and --json written."""
    from test_evaluate import make_folder, save_labels
    root, labels = make_folder(tmp_path / "data")
    pred = tmp_path / "pred"
    for name, ids in labels.items():
        save_labels(pred / name / "labels.png", ids, mode="P")
    args = ["--dataset", "folder", "--root", str(root), "--pred", str(pred), "--quiet"]
    fifo, device = tmp_path / "fifo", tmp_path / "device"
    os.mkfifo(fifo)
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for path in (fifo, device):
        assert evaluate.main([*args, "--json", str(path)]) == 2
        assert capsys.readouterr().err == (f"evaluate: error: --json {path}: not a regular file (a FIFO, socket or "
                                           "device); give the name of a file to write\n")
    assert not (pred / "summary.scores.json").exists() and not (pred / "a" / "gt.png").exists()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat(device).st_mode)
    fifo.rename(pred / "summary.scores.json")
    assert evaluate.main([*args, "--json", str(tmp_path / "scores.json")]) == 0
    assert capsys.readouterr().err == (f"evaluate: cannot write {pred / 'summary.scores.json'}: not a regular file "
                                       "(a FIFO, socket or device)\n")
    assert stat.S_ISFIFO(os.stat(pred / "summary.scores.json").st_mode)
    assert json.loads((tmp_path / "scores.json").read_text())["images"] == 2


@pytest.fixture
def unlistable(monkeypatch):
    """A folder the system refuses to list (as root, permissions cannot make one)."""
    def refuse(folder):
        def iterdir(self):
            if self == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self)
        monkeypatch.setattr(Path, "iterdir", iterdir)
    original = Path.iterdir
    return refuse


def test_folders_that_cannot_be_listed_are_one_line(tmp_path, unlistable, capsys):
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "a.png", (64, 64))
    unlistable(images)
    assert runner.main(["--image", str(images), "--weights", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"emerdiff: error: {images}: permission denied\n"
    from test_evaluate import make_folder
    root, _ = make_folder(tmp_path / "data")
    (tmp_path / "pred").mkdir()
    for folder, where in ((root / "images", "images"), (tmp_path / "pred", "--pred")):
        unlistable(folder)
        assert evaluate.main(["--dataset", "folder", "--root", str(root), "--pred", str(tmp_path / "pred")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "permission denied" in err and where in err


def test_a_prompt_that_is_no_text_is_refused_before_any_work(sd):
    with pytest.raises(EmerDiffError, match="the prompt holds a character that is no text"):
        emerdiff.segment(EXAMPLE, sd, prompt="cat \udcff")


# ---- ends: stdout, summaries, exit status ----

def test_a_closed_stdout_is_no_failure(tmp_path, tiny_sd_dir):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        save_image(images / f"{i}.png", (64, 64), seed=i)
    process = start_cli("--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"), *FAST)
    process.stdout.close()  # `| head` that read nothing
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and err == "", err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["done"] == 2


def test_a_summary_that_cannot_be_written_makes_the_status_2(tmp_path, tiny_sd_dir, capsys):
    out = tmp_path / "out"
    args = ["--image", str(EXAMPLE), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST]
    assert runner.main(args) == 0
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()  # in the way
    (out / "summary.json" / "x").write_text("")
    assert runner.main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"emerdiff: error: cannot write {out / 'summary.json'}")


def test_a_failed_run_says_why_in_its_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert runner.main(["--image", str(EXAMPLE), "--weights", str(tmp_path / "no-weights"), "--out", str(out)]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 0 and "no-weights" in summary["error"]


def share_run(tmp_path, tiny_sd_dir, rank, images, port):
    env = os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "localhost",
                        "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"}
    return start_cli("--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"), *FAST,
                     env=env)


def test_processes_of_a_torchrun_never_wait_for_each_other(tmp_path, tiny_sd_dir):
    """Rank 1 of 2 has no image (one image, two processes) and ends at once, not waiting for rank 0;
    rank 0, the last to end, merges both parts. A part of another run is never merged."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    save_image(images / "only.png", (64, 64))
    out.mkdir()
    (out / "summary.part0.json").write_text(json.dumps({"run": "an earlier run", "images": 9}))
    idle = share_run(tmp_path, tiny_sd_dir, 1, images, 29500)
    assert idle.wait(timeout=120) == 0, idle.stderr.read()
    assert not (out / "summary.json").exists()  # one part of this run is there: the other is not done
    working = share_run(tmp_path, tiny_sd_dir, 0, images, 29500)
    assert working.wait(timeout=300) == 0, working.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["done"]) == (1, 1)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["index.html", "summary.json"]


def test_a_failed_image_under_torchrun_ends_no_other_process(tmp_path, tiny_sd_dir):
    """Process 1's only image is unreadable and it ends first: it records the failure in its part and
    exits 0, so torchrun does not stop process 0, which segments both its images, merges the parts and
    exits 2 (torchrun's own status is then 1, as for any worker's non-zero one)."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for name in ("a", "c"):
        save_image(images / f"{name}.png", (64, 64))
    (images / "b.png").write_bytes(b"not a picture")  # the sorted list's second: process 1's share
    result = torchrun_cli("--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST)
    assert result.returncode == 1, result.stderr
    assert "exitcode  : 2" in result.stderr and "rank      : 0" in result.stderr  # torchrun's report of the merger
    for name in ("a", "c"):
        assert_complete(out / name, (64, 64))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["done"], summary["error"]) == (3, 2, None)
    assert [f["image"] for f in summary["failed"]] == [str(images / "b.png")]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["index.html", "summary.json"]
    assert f'"image":"{images / "b.png"}"' in (out / "index.html").read_text()  # the merger's page: every failure


@pytest.mark.parametrize("world, rank", [("abc", "0"), ("2", "5")])
def test_a_torchrun_environment_that_is_none_is_one_line(tmp_path, world, rank):
    result = subprocess.run([sys.executable, str(ROOT / "emerdiff.py"), "--image", str(EXAMPLE), "--out",
                             str(tmp_path)], env=os.environ | {"WORLD_SIZE": world, "RANK": rank,
                                                               "TORCHELASTIC_RUN_ID": "test"},
                            capture_output=True, text=True, timeout=120)
    assert_one_error(result, "are not a process of a torchrun")


def test_world_size_set_by_another_launcher_runs_every_image(tmp_path, tiny_sd_dir):
    """WORLD_SIZE and RANK without torchrun's own variables (another launcher's job): one process
    segments every image, says so, and writes summary.json."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for name in ("a", "b"):
        save_image(images / f"{name}.png", (64, 64))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")} | {"WORLD_SIZE": "2", "RANK": "0"}
    result = cli("--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST, env=env)
    assert result.returncode == 0, result.stderr
    assert "not by torchrun" in result.stderr
    for name in ("a", "b"):
        assert_complete(out / name, (64, 64))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["done"], summary["failed"]) == (2, 2, [])


# ---- the estimate ----

def test_the_estimate_takes_the_fastest_call_and_says_how_steady(monkeypatch):
    """A clock that each call advances by its own cost: an untimed first call, then the fastest of 3."""
    clock, costs = [0.0], iter([7.0, 2.0, 0.3, 0.5])
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += next(costs)
    fastest, spread = devices.fastest_and_spread(call, torch.device("cpu"))
    assert (fastest, spread) == pytest.approx((0.3, 2.0 / 0.3 - 1))  # the slowest over 6 times the fastest


def test_the_estimate_counts_calls_and_images_stage_by_stage(sd, monkeypatch):
    """Calls that cost what the clock says (a UNet call of one image 1 s at the working size and 0.25 s at
    the smallest latent, a decode 2 s): the cost model of docs/speed.md, worked out here by hand for 3
    masks, 10 draws and batches of 4: the feature passes in 3 calls, the 15 inversion steps in 4, each
    of the 15 modulated steps in 2 calls of 3 runs."""
    priced_calls(monkeypatch, sd, unet_s=1.0, fixed_s=0.25, decode_s=2.0)
    o = emerdiff.DEFAULTS | dict(masks=3, feature_samples=10, speed=dict(batch_size=4, compile=False, plain=True))
    e = devices.estimate(sd, (128, 128), o)
    steps, m = (281 - 1) // 20 + 1, devices.MODULATED_STEP["cpu"]  # t_m = 281 on the 50-step grid: 281, ..., 1
    calls = 0.4 * 3 + 4 + steps * 2
    images = 0.4 * 10 + steps + m * 6 * steps
    assert (e.unet_s, e.fixed_s, e.decodes, e.spread) == (1.0, 0.25, 6, 0)
    assert (e.unet_calls, e.unet_images) == pytest.approx((calls, images))
    assert e.seconds == pytest.approx(calls * 0.25 + images * 0.75 + 6 * 2.0)


def test_a_datasets_pixels_are_taken_as_stored_whatever_the_dataset(tmp_path, tiny_sd_dir):
    """--dataset folder ignores EXIF rotation as evaluate.py does (the presets always did), so a rotated
    JPEG is segmented and scored as stored. A single-process run also removes the summary parts of an
    earlier torchrun that was cut short."""
    from test_evaluate import save_labels
    root, out = tmp_path / "data", tmp_path / "out"
    (root / "images").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": shown as 64 wide, 96 high
    Image.open(save_image(tmp_path / "x.png", (96, 64))).save(root / "images" / "x.jpg", exif=exif)
    save_labels(root / "labels" / "x.png", [[0] * 96] * 64)
    out.mkdir()
    (out / "summary.part1.json").write_text("{}")
    assert runner.main(["--dataset", "folder", "--root", str(root), "--weights", str(tiny_sd_dir), "--out", str(out),
                        *FAST]) == 0
    assert_complete(out / "x", (96, 64))  # as stored
    assert not (out / "summary.part1.json").exists()
    assert evaluate.main(["--dataset", "folder", "--root", str(root), "--pred", str(out), "--quiet"]) == 0


@pytest.mark.parametrize("metadata", ["exif", "xmp"])
def test_pixels_taken_as_stored_are_never_rotated_later(tmp_path, metadata):
    """An orientation in EXIF or in XMP (Pillow reads both): to_rgb(exif_rotation=False) keeps the pixels as
    stored, and segment()'s own reading of the image (inputs.as_image) does not rotate them after all."""
    import inputs
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    path = tmp_path / "x.jpg"
    Image.new("RGB", (96, 64)).save(path, **({"exif": exif} if metadata == "exif" else {"xmp": xmp}))
    assert inputs.as_image(inputs.open_image(path)).size == (64, 96)  # honoured where wanted
    assert inputs.as_image(inputs.to_rgb(inputs.open_image(path), exif_rotation=False)).size == (96, 64)
