"""Datasets behind a URI (issue 25): read through a per-node cache, the same samples as a
local copy, checked before any work.

The fast tests reach the remote path through `file://` URIs (pyarrow's local filesystem
behind the same listing and cache as S3); the slow ones through the real S3 server on
loopback (moto), as users' buckets are.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seminar import storage
from seminar.config import DataConfig, load_spec
from seminar.data import DatasetError, build_dataset, make_click_table, write_click_table
from seminar.data import files as data_files
from seminar.data.files import DataRoot

DATA = Path(__file__).parent / "data"
VOC = DATA / "voc_tiny"
CAMVID = DATA / "camvid_tiny"
PYTHON = sys.executable
TINY = ["data.crop_size=[64, 64]", "data.load_scale=0.25", "optim.batch_size=2", "students.0.decoder_channels=16",
        "students.1.decoder_channels=16", "schedule.eval_every=1"]


def make_folder_dataset(root: Path) -> Path:
    """A folder dataset from the VOC fixture's photos and masks: 4 images, 2 of them clicked."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = sorted(p.stem for p in (VOC / "SegmentationClass").glob("*.png"))[:4]
    for image_id in ids:
        shutil.copy(VOC / "JPEGImages" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
        mask = np.array(Image.open(VOC / "SegmentationClass" / f"{image_id}.png"))
        Image.fromarray(np.where(mask == 255, 255, (mask > 0)).astype(np.uint8)).save(root / "masks" / f"{image_id}.png")
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    table = make_click_table([ids[0], ids[0], ids[1]], [10.0, 200.0, 40.0], [10.0, 150.0, 60.0], [0, 1, 1],
                             [1, 2, 1], "user")
    write_click_table(table, str(root / "clicks.parquet"))
    return root


def folder_config(root: str, clicks: str, **changes) -> DataConfig:
    return DataConfig(dataset="folder", root=root, clicks=clicks, classes=["background", "object"], **changes)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own node cache (as on a fresh node)."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def assert_same_samples(a, b) -> None:
    assert a.image_ids == b.image_ids and list(a.clicked) == list(b.clicked) and a.info == b.info
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x.image, y.image) and np.array_equal(x.clicks, y.clicks)
        assert (x.mask is None and y.mask is None) or np.array_equal(x.mask, y.mask)


def test_a_folder_dataset_behind_a_uri_reads_the_same_samples_through_the_cache(tmp_path, cache):
    root = make_folder_dataset(tmp_path / "data")
    local = build_dataset(folder_config(str(root), str(root / "clicks.parquet")), "train")
    remote = build_dataset(folder_config(f"file://{root}", str(root / "clicks.parquet")), "train")
    def cached_images():
        return [p for p in cache.iterdir() if p.suffix in (".jpg", ".png")]

    assert not cached_images()  # built from one listing and the split file: no image read yet
    assert remote.click_fit is None and local.click_fit is not None  # remote clicks are fitted as read
    assert_same_samples(local, remote)
    cached = sorted(p.stat().st_size for p in cached_images())
    wanted = sorted([*(p.stat().st_size for p in (root / "images").iterdir()),
                     *(p.stat().st_size for p in (root / "masks").iterdir())])
    assert cached == wanted  # each image and mask once, complete
    assert not list(cache.glob(".*"))  # no partial file left


def test_camvid_and_voc_layouts_behind_a_uri_read_the_same_samples(tmp_path, cache):
    for layout, root, extra in (("camvid", CAMVID, {}), ("voc", VOC, {"clicks": str(VOC / "points_main.json")})):
        for split in ("train", "val"):
            local = build_dataset(DataConfig(dataset=layout, root=str(root), **extra), split)
            remote = build_dataset(DataConfig(dataset=layout, root=f"file://{root}", **extra), split)
            assert_same_samples(local, remote)


def test_the_cache_keeps_the_most_recently_used_files_under_its_cap(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        (src / f"f{k}.bin").write_bytes(bytes([k]) * 1000)
    monkeypatch.setenv(data_files.CACHE_MAX_ENV, str(3500 / 1e9))  # room for 3 files
    root = DataRoot(f"file://{src}")
    for k in range(4):
        root.read_bytes(f"f{k}.bin")
    os.utime(root.cached("f0.bin"), (1, 1))  # f0 used long ago, f1 (then f2, f3) more recently
    root.read_bytes("f1.bin")  # a use marks f1 recent again: f0 goes first, then f2
    for k in (4, 5):
        root.read_bytes(f"f{k}.bin")  # each fetch past 5% of the cap rescans the folder and evicts
    kept = sorted(p.read_bytes()[0] for p in cache.iterdir())
    assert kept == [1, 4, 5] and sum(p.stat().st_size for p in cache.iterdir()) <= 3500
    assert root.read_bytes("f0.bin") == bytes([0]) * 1000  # evicted files are fetched again


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "1e300"])
def test_a_cache_cap_that_is_not_a_size_is_one_line(tmp_path, cache, monkeypatch, value):
    (tmp_path / "a.txt").write_bytes(b"a")
    monkeypatch.setenv(data_files.CACHE_MAX_ENV, value)
    with pytest.raises(DatasetError, match=rf"^SEMINAR_CACHE_MAX_GB='{re.escape(value)}': not a size in GB"):
        DataRoot(f"file://{tmp_path}").read_bytes("a.txt")


def _fill(uri: str, keys: list[str], cache_env: str, queue) -> None:
    os.environ[storage.CACHE_ENV] = cache_env
    root = DataRoot(uri)
    queue.put([root.read_bytes(k) for k in keys])


def test_workers_filling_one_cache_at_once_each_read_whole_files(tmp_path, cache):
    src = tmp_path / "src"
    src.mkdir()
    keys = [f"f{k}.bin" for k in range(8)]
    for k, key in enumerate(keys):
        (src / key).write_bytes(os.urandom(200_000 + k))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_fill, args=(f"file://{src}", keys, os.environ[storage.CACHE_ENV], queue))
               for _ in range(4)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    expected = [(src / key).read_bytes() for key in keys]
    assert all(r == expected for r in results)
    assert sorted(p.stat().st_size for p in cache.iterdir()) == [200_000 + k for k in range(8)]
    assert not list(cache.glob(".*"))


def test_a_changed_file_is_fetched_again(tmp_path, cache):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"old")
    assert DataRoot(f"file://{src}").read_bytes("a.txt") == b"old"
    (src / "a.txt").write_bytes(b"newer")
    data_files._listing.cache_clear()  # a new process lists the root again
    assert DataRoot(f"file://{src}").read_bytes("a.txt") == b"newer"


@pytest.mark.parametrize("case, message", [
    ("missing root", r"^file://.*/nowhere: not found \(no object under this prefix\)$"),
    ("no image folder", r"^file://.*/data/images: image folder not found$"),
    ("empty image folder", r"^file://.*/data/images: no images \(\.jpg, \.jpeg, \.png\)$"),
    ("split names an absent image", r"^file://.*/data/train\.txt: image 'ghost' not found in file://.*/data/images "
                                    r"\(1 missing\)$"),
])
def test_remote_dataset_problems_are_one_line_naming_the_uri(tmp_path, cache, case, message):
    root = make_folder_dataset(tmp_path / "data")
    uri = f"file://{root}"
    if case == "missing root":
        uri = f"file://{tmp_path}/nowhere"
    elif case == "no image folder":
        shutil.rmtree(root / "images")
    elif case == "empty image folder":
        for p in (root / "images").iterdir():
            p.unlink()
        (root / "train.txt").unlink()
    else:
        (root / "train.txt").write_text("ghost\n")
    with pytest.raises(DatasetError, match=message):
        build_dataset(folder_config(uri, str(root / "clicks.parquet")), "train")


def test_evaluating_elsewhere_does_not_read_the_training_click_table(tmp_path, cache):
    """A val set is built without clicks: a table naming other images, or gone, is not read."""
    root = make_folder_dataset(tmp_path / "data")
    val = build_dataset(folder_config(str(root), str(tmp_path / "gone.parquet")), "val", clicks=False)
    assert len(val) == 2 and not val.clicked.any() and val[0].mask is not None


def test_a_run_whose_data_is_gone_fails_naming_the_file(tmp_path, cache):
    """The images vanish after the checks listed them: the first read fails with one line
    naming the file's URI (from the data-loading process, not its traceback)."""
    from seminar.checks import load_checked_spec
    from seminar.runs import run_in_process

    root = make_folder_dataset(tmp_path / "data")
    cfg = load_checked_spec(None, [*TINY, "data.dataset=folder", "data.classes=[background,object]",
                                   f"data.root=file://{root}", f"data.clicks={root}/clicks.parquet", "optim.steps=2",
                                   f"storage.path={tmp_path / 'runs'}", "resources.loader_workers=1"])
    shutil.rmtree(root / "images")
    with pytest.raises(DatasetError) as err:
        run_in_process(cfg)
    assert re.fullmatch(rf"file://{root}/images/\S+\.jpg: cannot be read \(.*\)", str(err.value)), str(err.value)


def test_seminar_evaluate_on_other_data_does_not_need_the_runs_click_table(tmp_path, cache):
    """A run trained from a click table, evaluated with `--set data.root=OTHER --set
    data.val_split=X` on a folder its table never named (and the table gone): scored."""
    from typer.testing import CliRunner

    from jobs.main import app
    from seminar.runs import run_in_process

    root = make_folder_dataset(tmp_path / "data")
    other = make_folder_dataset(tmp_path / "other")
    for p in (other / "images").iterdir():  # other image ids than the table names
        p.rename(p.with_name(f"x{p.name}"))
    for p in (other / "masks").iterdir():
        p.rename(p.with_name(f"x{p.name}"))
    (other / "held_out.txt").write_text("\n".join(sorted(p.stem for p in (other / "images").iterdir())[:2]) + "\n")
    cfg = load_spec(None, [*TINY, "data.dataset=folder", "data.classes=[background,object]", f"data.root={root}",
                           f"data.clicks={root}/clicks.parquet", "optim.steps=1", "resources.loader_workers=0",
                           f"storage.path={tmp_path / 'runs'}", "storage.run_name=clicked"])
    run_in_process(cfg)
    (root / "clicks.parquet").unlink()
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "runs" / "clicked"), "--set", f"data.root={other}",
                                      "--set", "data.val_split=held_out"])
    assert result.exit_code == 0, result.output
    assert "on folder held_out, 2 images" in " ".join(result.output.split()) and "mIoU" in result.output


# --- The real S3 server on loopback ----------------------------------------------------


def upload(local: Path, uri: str) -> None:
    storage.upload_dir(local, uri)


def first_step_loss(spec_overrides: list[str], tmp_path: Path, name: str) -> float:
    from seminar.history import read_history
    from seminar.runs import run_in_process

    cfg = load_spec(None, [*spec_overrides, "optim.steps=1", "schedule.log_every=1", "schedule.eval_every=1",
                           "schedule.checkpoint_every=1", f"storage.path={tmp_path / 'runs'}",
                           f"storage.run_name={name}", "resources.loader_workers=0"])
    run_in_process(cfg)
    return [h for h in read_history(str(tmp_path / "runs" / name)) if "s0/loss" in h][0]["s0/loss"]


@pytest.mark.slow
def test_datasets_uploaded_to_s3_train_the_same_first_step_as_the_local_copy(s3_bucket, tmp_path, cache):
    root = make_folder_dataset(tmp_path / "folder")
    upload(root, f"s3://{s3_bucket}/folder")
    upload(CAMVID, f"s3://{s3_bucket}/camvid")
    folder = ["data.dataset=folder", "data.classes=[background,object]"]
    cases = {
        "folder": ([*folder, f"data.root={root}", f"data.clicks={root}/clicks.parquet"],
                   [*folder, f"data.root=s3://{s3_bucket}/folder", f"data.clicks=s3://{s3_bucket}/folder/clicks.parquet"]),
        "camvid": (["data.dataset=camvid", f"data.root={CAMVID}"],
                   ["data.dataset=camvid", f"data.root=s3://{s3_bucket}/camvid"]),
    }
    for layout, (local, remote) in cases.items():
        assert first_step_loss([*TINY, *local], tmp_path, f"{layout}-local") == \
            first_step_loss([*TINY, *remote], tmp_path, f"{layout}-s3")
    assert any(cache.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing prefix", "s3://{bucket}/nothing: not found (no object under this prefix)"),
    ("no such bucket", "s3://nobucket-{bucket}/data: no such bucket 'nobucket-{bucket}'"),
    ("split names an absent key", "s3://{bucket}/data/train.txt: image 'ghost' not found in s3://{bucket}/data/images"),
    ("unreachable endpoint", "s3://{bucket}/data: cannot be listed"),
])
def test_seminar_train_refuses_bad_s3_data_before_the_run_starts(s3_bucket, tmp_path, case, message):
    root = make_folder_dataset(tmp_path / "data")
    if case == "split names an absent key":
        (root / "train.txt").write_text("ghost\n")
    upload(root, f"s3://{s3_bucket}/data")
    data = {"missing prefix": f"s3://{s3_bucket}/nothing", "no such bucket": f"s3://nobucket-{s3_bucket}/data"}
    env = {**os.environ, storage.S3_TIMEOUT_ENV: "5"}
    if case == "unreachable endpoint":  # (moto checks no credentials: a wrong key cannot be shown here)
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    uri = data.get(case, f"s3://{s3_bucket}/data")
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.main", "train", "--in-process", "--set", "data.dataset=folder", "--set", f"data.root={uri}",
         "--set", f"data.clicks={root}/clicks.parquet", "--set", "data.classes=[background,object]",
         "--set", f"storage.path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message.format(bucket=s3_bucket) in proc.stderr
    assert "Traceback" not in proc.stderr and "run " not in proc.stdout  # before the run is announced
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_annotation_loop_with_everything_in_a_bucket(s3_bucket, tmp_path):
    """Images in a bucket; correction clicks in a click store on S3 (written as the endpoint
    writes them: seminar.data.append_clicks); `seminar train` reads both; `seminar predict`
    writes its masks beside them; the README's three commands, with a run for the registry."""
    from seminar.data import load_clicks
    from seminar.data.clicks import append_clicks

    root = make_folder_dataset(tmp_path / "photos")
    bucket = f"s3://{s3_bucket}"
    storage.upload_dir(root / "images", f"{bucket}/photos/images")
    table = load_clicks(str(root / "clicks.parquet"))
    append_clicks(f"{bucket}/clicks", table.slice(0, 2))  # two submissions from the page
    append_clicks(f"{bucket}/clicks", table.slice(2))

    def seminar(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([PYTHON, "-m", "jobs.main", *args], capture_output=True, text=True, timeout=900,
                              env={**os.environ, storage.CACHE_ENV: str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    seminar("train", "--in-process", "--set", "data.dataset=folder", "--set", f"data.root={bucket}/photos",
            "--set", f"data.clicks={bucket}/clicks", "--set", "data.classes=[background,object]",
            "--set", f"storage.path={tmp_path / 'runs'}", "--set", "storage.run_name=loop",
            *[x for o in [*TINY, "optim.steps=2", "schedule.checkpoint_every=2"]
              for x in ("--set", o)])
    seminar("predict", str(tmp_path / "runs" / "loop"), f"{bucket}/photos/images", "--out", f"{bucket}/predictions",
            "--runtime", "torch")  # (the ONNX export is tested elsewhere)
    written = storage.list_files(f"{bucket}/predictions")
    images = sorted(p.stem for p in (root / "images").iterdir())
    assert images and all(any(name.startswith(i) for name in written) for i in images), written


@pytest.mark.slow
def test_an_s3_that_stalls_while_images_are_fetched_does_not_fail_the_run(s3_server, s3_bucket, tmp_path, cache,
                                                                           monkeypatch):
    """moto stopped (SIGSTOP) for 5 s at the first image fetched, with an S3 request timeout
    of 2 s: the fetch times out and is retried (pyarrow's retries, as checkpoint uploads get),
    and the run ends with every step. The stall follows the fetch (moto's log), not the clock."""
    import signal
    import threading

    from seminar.runs import run_in_process

    monkeypatch.setenv(storage.S3_TIMEOUT_ENV, "2")
    root = make_folder_dataset(tmp_path / "data")
    storage.upload_dir(root, f"s3://{s3_bucket}/data")
    fetched, done, stalls = threading.Event(), threading.Event(), []

    def on_request(line: str) -> None:
        if f"GET /{s3_bucket}/data/images/" in line:
            fetched.set()

    def stall_once():
        if fetched.wait(600) and not done.is_set():
            os.kill(s3_server.process.pid, signal.SIGSTOP)
            stalls.append(1)
            done.wait(5)
            os.kill(s3_server.process.pid, signal.SIGCONT)

    s3_server.on_request.append(on_request)
    staller = threading.Thread(target=stall_once, daemon=True)
    staller.start()
    cfg = load_spec(None, [*TINY, "data.dataset=folder", "data.classes=[background,object]",
                           f"data.root=s3://{s3_bucket}/data", f"data.clicks=s3://{s3_bucket}/data/clicks.parquet",
                           "optim.steps=3", f"storage.path={tmp_path / 'runs'}", "storage.run_name=stalled"])
    try:
        result = run_in_process(cfg)
    finally:
        done.set()
        staller.join()
        os.kill(s3_server.process.pid, signal.SIGCONT)
        s3_server.on_request.remove(on_request)
    assert result.metrics["step"] == 3 and stalls == [1]
