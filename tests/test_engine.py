"""The training loop in one process: tiny CPU models that really train a few steps."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jobs.main import app
from seminar.config import load_spec
from seminar.engine import WorkerContext, train_worker
from seminar.exchange import InProcessExchange
from seminar.predict import Segmenter
from seminar.runs import run_in_process

TINY = [
    "data.synthetic.image_size=32", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
    "data.crop_size=[32, 32]", "optim.batch_size=4", "optim.lr=0.003",
    "students.0.decoder_channels=16", "students.1.decoder_channels=16",
    "resources.loader_workers=0", "method.ss_start=0", "method.rampup_steps=2",
]


def tiny_spec(tmp_path, *extra):
    return load_spec(None, TINY + [f"storage.path={tmp_path}", *extra])


def run(cfg, resume_from=None):
    logged = []
    saved = {}

    def report(metrics, directory):
        logged.append(metrics)
        if directory:
            saved[metrics["step"]] = checkpoint_copy(directory, cfg, metrics["step"])

    def checkpoint_copy(directory, cfg, step):
        import shutil

        target = f"{cfg.storage.path}/copy_{step}"
        shutil.copytree(directory, target, dirs_exist_ok=True)
        return target

    ctx = WorkerContext(students=list(range(cfg.num_students)))
    train_worker(cfg, ctx, InProcessExchange(cfg.num_students), report, resume_from=resume_from)
    return logged, saved


def test_loss_falls_over_real_steps(tmp_path):
    # four images seen again and again (augmented differently each time)
    cfg = tiny_spec(tmp_path, "optim.steps=16", "schedule.log_every=1", "schedule.eval_every=16",
                    "schedule.checkpoint_every=16", "method.w_ts=0", "method.w_ss=0",
                    "optim.lr=0.01", "data.synthetic.num_train=4")
    logged, _ = run(cfg)
    for k in range(2):
        losses = [m[f"s{k}/loss_sup"] for m in logged]
        assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


def test_seminar_run_reports_every_student_and_checkpoints(tmp_path):
    cfg = tiny_spec(tmp_path, "optim.steps=4", "schedule.log_every=1", "schedule.eval_every=4",
                    "schedule.checkpoint_every=2", "method.tau=0")
    logged, saved = run(cfg)
    last = logged[-1]
    for k in range(2):
        for key in ("loss", "loss_sup", "loss_ts", "loss_ss", "pseudo_frac", "step_time", "step_cpu_time",
                    "step_thread_cpu_time", "exchange_wait", "images_per_s", "val_miou_student", "val_miou_teacher"):
            assert f"s{k}/{key}" in last
        assert 0 < last[f"s{k}/step_thread_cpu_time"] <= last[f"s{k}/step_cpu_time"] + 1e-3
        assert last[f"s{k}/pseudo_frac"] == pytest.approx(1.0)  # tau=0: every unclicked valid pixel gets a label
        assert last[f"s{k}/loss_ss"] > 0 and last[f"s{k}/loss_ts"] > 0
        # diagnostics against the synthetic masks (never trained on)
        assert 0 <= last[f"s{k}/diag_pseudo_acc"] <= 1 and 0 <= last[f"s{k}/diag_student_acc"] <= 1
    # click purity of the batches as trained on (synthetic masks): reported with every log line
    assert all(0.9 <= m["data/click_purity"] <= 1 for m in logged), [m.get("data/click_purity") for m in logged]
    assert {k for k in last if k.startswith("data/click_purity/")}
    # the served network: the best of the teachers and their ensemble on val, named in the checkpoint
    scores = {"teacher_0": last["s0/val_miou_teacher"], "teacher_1": last["s1/val_miou_teacher"],
              "teacher_ensemble": last["val_miou_teacher_ensemble"]}
    assert last["val/miou"] == max(scores.values())
    assert sorted(saved) == [2, 4]
    meta = json.loads((tmp_path / "copy_4" / "meta.json").read_text())
    assert scores[meta["served"]] == max(scores.values())
    assert meta["step"] == 4 and meta["click_source"] == "simulated" and meta["classes"][0] == "background"
    assert (tmp_path / "copy_4" / "student_1" / "teacher.pt").is_file()


@pytest.mark.parametrize("few_clicked", [[], ["data.clicked_images=3", "method.cutmix_prob=1", "optim.unlabelled_batch_size=4"]],
                         ids=["all_clicked", "3_clicked_cutmix"])
def test_resume_continues_with_the_same_numbers(tmp_path, few_clicked):
    cfg = tiny_spec(tmp_path, "optim.steps=4", "schedule.log_every=1", "schedule.eval_every=100",
                    "schedule.checkpoint_every=2", *few_clicked)
    straight, saved = run(cfg)
    resumed, _ = run(cfg, resume_from=saved[2])
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        for k in range(2):
            assert a[f"s{k}/loss_sup"] == pytest.approx(b[f"s{k}/loss_sup"], rel=1e-5, abs=1e-6)
            # the checkpoint holds the look-ahead the interrupted run had made: same pseudo-labels
            assert a[f"s{k}/loss"] == pytest.approx(b[f"s{k}/loss"], rel=1e-5, abs=1e-6)


def test_segmenter_loads_a_checkpoint_and_segments(tmp_path):
    cfg = tiny_spec(tmp_path, "optim.steps=2", "schedule.checkpoint_every=2")
    result = run_in_process(cfg)
    for which in ("best_teacher", "primary_teacher", "primary_student", "teacher_ensemble"):
        seg = Segmenter.load(result.checkpoint, which=which)
        label, conf = seg.segment(np.zeros((37, 45, 3), np.uint8))
        assert label.shape == (37, 45) and label.dtype == np.uint8 and label.max() < len(seg.classes)
        assert conf.shape == (37, 45) and 0 < conf.min() <= conf.max() <= 1
    assert len(Segmenter.load(result.checkpoint, which="teacher_ensemble").network.network.networks) == 2
    # a second start with the same run name resumes from its last checkpoint
    again = run_in_process(cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"run_name": result.run_name})}))
    assert again.checkpoint == result.checkpoint


def test_next_round_starts_from_the_trained_teachers(tmp_path):
    """students.K.init_from: the annotation loop's next round starts where the last one ended,
    each student from its own teacher there (not from ImageNet or from scratch)."""
    from seminar.checkpoint import read_weights
    from seminar.engine import StudentTask

    first = run_in_process(tiny_spec(tmp_path, "optim.steps=2", "schedule.checkpoint_every=2"))
    cfg = tiny_spec(tmp_path, f"students.0.init_from={tmp_path}/{first.run_name}", f"students.1.init_from={first.checkpoint}")
    for k in range(2):
        task = StudentTask(cfg, k, cfg.data.synthetic.num_classes, WorkerContext(students=[k]))
        teacher = read_weights(first.checkpoint, k, "teacher")
        assert all(torch.equal(v, teacher[name]) for name, v in task.net.state_dict().items())
        assert all(torch.equal(v, teacher[name]) for name, v in task.teacher.module.state_dict().items())
    # refused before any work, naming the field: another network, no such model
    runner = CliRunner()
    base = ["train", "--in-process", *[a for s in TINY for a in ("--set", s)], "--set", f"storage.path={tmp_path}"]
    out = runner.invoke(app, [*base, "--set", "students.0.decoder_channels=32", "--set", f"students.0.init_from={first.checkpoint}"])
    assert out.exit_code == 2 and "students.0.init_from" in out.output and "decoder_channels 16" in out.output, out.output
    out = runner.invoke(app, [*base, "--set", f"students.0.init_from={tmp_path}/nope"])
    assert out.exit_code == 2 and "students.0.init_from" in out.output, out.output


def test_cli_train_then_evaluate(tmp_path):
    runner = CliRunner()
    args = ["train", "--in-process", *[a for s in TINY for a in ("--set", s)],
            "--set", "optim.steps=2", "--set", f"storage.path={tmp_path}"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "mIoU" in out.output and "clicks: simulated" in out.output
    # live progress, as plain lines when not on a terminal: each report, then each evaluation
    assert re.search(r"^step 2/2 \(100%, eta 0m00s\) .*s1 sup \d", out.output, re.M), out.output
    assert re.search(r"^step 2: val mIoU: served 0\.\d+; s0 student", out.output, re.M), out.output
    ckpt = out.output.split("checkpoint:")[-1].split()[0]
    grid = tmp_path / "grid.png"
    out = runner.invoke(app, ["evaluate", ckpt, "--grid", str(grid), "--samples", "2"])
    assert out.exit_code == 0, out.output
    assert "mIoU" in out.output and "background" in out.output
    assert grid.stat().st_size > 1000
    # 2 rows of 3 in at 80 dpi, 12 in wide, and above them a legend band with every class's swatch
    from PIL import Image

    picture = np.asarray(Image.open(grid).convert("RGB"))
    assert picture.shape[1] == 960 and picture.shape[0] > 2 * 3 * 80, picture.shape
    band = picture[: picture.shape[0] - 2 * 3 * 80]
    for colour in Segmenter.load(ckpt).palette:
        assert (band == colour).all(-1).sum() > 20, colour
    # the run directory names its latest complete checkpoint (a half-written newer one is skipped)
    run_dir = Path(ckpt).parent.parent
    (run_dir / "checkpoints" / "step_9999999" / "student_0").mkdir(parents=True)
    by_run = runner.invoke(app, ["evaluate", str(run_dir)])
    assert by_run.exit_code == 0, by_run.output
    assert by_run.output.split("mIoU")[-1] == out.output.split("mIoU")[-1].split("grid:")[0]
    # the run, read back: listed, shown, plotted from its metrics.jsonl
    # not a terminal: the console is 160 wide, the run column never folded
    listed = runner.invoke(app, ["runs", "list", "--path", str(tmp_path)])
    assert listed.exit_code == 0 and run_dir.name in listed.output and "2/2" in listed.output, listed.output
    shown = runner.invoke(app, ["runs", "show", run_dir.name, "--path", str(tmp_path)])
    assert shown.exit_code == 0 and "finished" in shown.output and "s1/loss_sup" in shown.output, shown.output
    curves = tmp_path / "curves.png"
    plotted = runner.invoke(app, ["runs", "plot", str(run_dir), "--out", str(curves)])
    assert plotted.exit_code == 0 and curves.stat().st_size > 10_000, plotted.output
    missing = runner.invoke(app, ["runs", "show", "nope", "--path", str(tmp_path)])
    assert missing.exit_code == 2 and "no run there" in missing.output


def test_cli_rejects_a_bad_spec_before_training(tmp_path):
    out = CliRunner().invoke(app, ["train", "--in-process", "--set", "method.ema_decay=1.7"])
    assert out.exit_code == 2
    assert "method.ema_decay" in out.output
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert out.exit_code == 2 and "not a checkpoint" in out.output


def test_bf16_autocast_and_channels_last_train_on_the_cpu(tmp_path):
    """The GPU switches (resources.precision, resources.channels_last) run on the CPU too:
    the in-process run trains, its losses are finite, weights stay fp32 in channels-last."""
    from seminar.engine import StudentTask

    cfg = tiny_spec(tmp_path, "optim.steps=2", "resources.precision=bf16", "resources.channels_last=true",
                    "resources.device=cpu")
    result = run_in_process(cfg)
    history = [json.loads(line) for line in (tmp_path / result.run_name / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and all(np.isfinite(history[-1][f"s{k}/loss"]) for k in range(2))
    ctx = WorkerContext(students=[0], precision="bf16", channels_last=True)
    student = StudentTask(cfg, 0, 4, ctx)
    convs = [m.weight for m in student.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert all(w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with ctx.autocast():
        assert student.net(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16


def test_cuda_asked_for_without_one_is_refused_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = CliRunner().invoke(app, ["train", "--in-process", "--set", "resources.device=cuda",
                                   "--set", f"storage.path={tmp_path}"])
    assert out.exit_code == 2 and "resources.device=cuda" in out.output and not any(tmp_path.iterdir())


def read_scalars(event_file: bytes) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from a TensorBoard event file (TFRecord framing: length, crc,
    an Event protobuf, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    offset = 0
    while offset < len(event_file):
        (length,) = struct.unpack_from("<Q", event_file, offset)
        event = Event.FromString(event_file[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tensorboard_scalars_beside_the_history(where, tmp_path, request):
    """storage.tensorboard: every report's metrics as TensorBoard scalars in <run>/tensorboard,
    the same numbers as metrics.jsonl, locally and on S3."""
    from seminar import storage
    from seminar.history import read_history

    runs = f"s3://{request.getfixturevalue('s3_bucket')}/runs" if where == "s3" else str(tmp_path)
    cfg = tiny_spec(runs, "optim.steps=4", "schedule.log_every=2", "schedule.eval_every=4",
                    "storage.tensorboard=true")
    result = run_in_process(cfg)
    run_dir = f"{runs}/{result.run_name}"
    files = storage.list_files(f"{run_dir}/tensorboard")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents."), files
    scalars = read_scalars(storage.read_bytes(f"{run_dir}/tensorboard/{files[0]}"))
    history = read_history(run_dir)
    assert sorted(scalars["s1/loss_sup"]) == [h["step"] for h in history] == [2, 4]
    assert scalars["s1/loss_sup"][4] == pytest.approx(history[-1]["s1/loss_sup"], rel=1e-6)
    assert scalars["val/miou"] == {4: pytest.approx(history[-1]["val/miou"], rel=1e-6)}


def test_schedule_reports_evaluates_checkpoints_and_resumes_on_time():
    """The loop alone, with a trivial model (one weight fitted by SGD): reports every
    log_every steps and at each evaluation and checkpoint, the mean of the step metrics since
    the last report; evaluations and checkpoints on their own periods and at the last step;
    a resume from a checkpoint's step continues the same schedule."""
    from seminar.config import ScheduleConfig
    from seminar.engine import run_schedule

    schedule = ScheduleConfig(log_every=3, eval_every=4, checkpoint_every=5)

    def run_from(start: int, weight: float):
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(model.weight, weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        seen = []

        def train_step(step):
            loss = (model(torch.ones(1, 1)) - 2.0).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"loss": loss.item(), "index": float(step)}

        def on_report(metrics, due):
            if due.evaluate:
                metrics["val"] = model.weight.item()
            seen.append((metrics["step"], due.evaluate, due.checkpoint, metrics["index"], model.weight.item()))

        last = run_schedule(schedule, 10, start, train_step, on_report)
        return seen, last

    seen, last = run_from(0, 0.0)
    assert [s[0] for s in seen] == [3, 4, 5, 6, 8, 9, 10]
    assert [s[0] for s in seen if s[1]] == [4, 8, 10] and [s[0] for s in seen if s[2]] == [5, 10]
    # each report averages the steps since the previous one (step indices 0-2, then 3, 4, 5, 6-7, 8, 9)
    assert [s[3] for s in seen] == [1.0, 3.0, 4.0, 5.0, 6.5, 8.0, 9.0]
    assert last["step"] == 10 and last["val"] == pytest.approx(2.0, abs=0.05)  # the model learnt
    # resumed at the step-5 checkpoint with its weight: the same reports, the same weights
    resumed, _ = run_from(5, seen[2][4])
    assert resumed == [s for s in seen if s[0] > 5]
    assert run_schedule(schedule, 10, 10, lambda step: pytest.fail("a finished run trains"), None) == {}


# ---------------------------------------------------------------------------------------
# Click a few, train on all: two streams, CutMix, the collapse guard.


def step_batches(tmp_path, *extra, start=0, unlabelled_batch_size=3):
    from seminar.data import SeminarViews, build_dataset
    from seminar.engine import StepBatches

    cfg = tiny_spec(tmp_path, *extra)
    dataset = build_dataset(cfg.data, "train")
    views = SeminarViews(cfg.data.crop_size, cfg.data.scale_range, cfg.data.click_radius,
                         [s.augment for s in cfg.students], seed=cfg.optim.seed)
    return StepBatches(dataset, views, [0, 1], cfg.optim.batch_size, unlabelled_batch_size, 0, 1, cfg.optim.seed,
                       start, 50)


def test_two_streams_hold_clicked_images_every_step_and_cover_the_unclicked_ones(tmp_path):
    # 3 clicked images (fewer than a batch of 4) and 13 unclicked ones
    batches = step_batches(tmp_path, "data.clicked_images=3")
    clicked = set(np.flatnonzero(batches.dataset.clicked))
    assert len(clicked) == 3 and len(batches.unlabelled) == 13
    seen_unclicked = []
    for step in range(13):
        items = batches.indices(step)
        labelled = [j for _, j, is_labelled in items if is_labelled]
        unlabelled = [j for _, j, is_labelled in items if not is_labelled]
        assert len(labelled) == 4 and set(labelled) <= clicked  # never a step without clicks
        assert len(unlabelled) == 3 and not set(unlabelled) & clicked
        seen_unclicked += unlabelled
    # three epochs of the unclicked stream: each a permutation of the 13 images
    assert sorted(seen_unclicked[:13]) == sorted(seen_unclicked[13:26]) == sorted(batches.unlabelled)
    batch = batches[0]
    assert batch["labelled"].tolist() == [True] * 4 + [False] * 3
    assert (batch["click_map"][4:] == 255).all() and (batch["click_map"][:4] != 255).any()


def test_two_streams_are_deterministic_and_resume_at_any_step(tmp_path):
    first = step_batches(tmp_path, "data.clicked_images=5")
    again = step_batches(tmp_path, "data.clicked_images=5", start=7)  # a run resumed at step 7
    assert [first.indices(s) for s in range(20)] == [again.indices(s) for s in range(20)]
    for key, value in first[7].items():
        assert torch.equal(value, again[0][key]), key
    # another seed draws other batches
    other = step_batches(tmp_path, "data.clicked_images=5", "optim.seed=1")
    assert [first.indices(s) for s in range(4)] != [other.indices(s) for s in range(4)]


def test_no_unclicked_images_drawn_when_no_term_learns_from_them(tmp_path):
    cfg = tiny_spec(tmp_path, "optim.steps=2", "schedule.log_every=1", "data.clicked_images=4",
                    "method.w_ts=0", "method.w_ss=0", "schedule.eval_every=2")
    logged, _ = run(cfg)
    # the click-only baseline trains on the clicked images alone: 4 of them a step, one epoch a step
    assert [m["epoch"] for m in logged] == [1.0, 2.0]


def test_collapse_warning_fires_on_a_one_class_teacher(caplog):
    from seminar.engine import COLLAPSE_SHARE, teacher_shares, warn_collapse

    batch = {"labelled": torch.tensor([True, False, False]), "valid": torch.ones(3, 8, 8, dtype=torch.bool),
             "click_map": torch.full((3, 8, 8), 255)}
    batch["click_map"][0, 2, 2] = 1
    probs = torch.full((3, 4, 8, 8), 0.1)
    probs[:, 2] = 0.7  # every pixel class 2 ...
    probs[1, 3, :2] = 0.9  # ... but two rows of the second image (of 128 unclicked pixels there)
    shares = teacher_shares(probs, batch)
    assert shares["teacher_share/2"] == pytest.approx(112 / 128) and shares["teacher_share/3"] == pytest.approx(16 / 128)
    assert shares["teacher_share/2"] >= COLLAPSE_SHARE
    cfg = load_spec(None, ["method.rampup_steps=10", "method.ema_warmup_steps=10"])
    classes = ("background", "a", "b", "c")
    metrics = {"step": 20, "data/click_share/2": 0.25, **{f"s0/{k}": v for k, v in shares.items()},
               **{f"s1/teacher_share/{c}": 0.25 for c in range(4)}}
    with caplog.at_level("WARNING", logger="seminar.engine"):
        warn_collapse(cfg, metrics, classes, {0: None, 1: None})
        warn_collapse(cfg, {**metrics, "step": 5}, classes, {0: None, 1: None})  # still warming up: quiet
    assert [r.getMessage() for r in caplog.records] == [
        "step 20: student 0's teacher labels 88% of the unclicked pixels b (clicks: 25% b): its pseudo-labels are "
        "collapsing to one class"]


def test_a_few_clicked_images_train_with_cutmix_and_report_class_shares(tmp_path):
    cfg = tiny_spec(tmp_path, "optim.steps=3", "schedule.log_every=1", "schedule.eval_every=3",
                    "data.clicked_images=0.25", "method.cutmix_prob=1", "optim.unlabelled_batch_size=4",
                    "method.tau=0")
    logged, _ = run(cfg)
    last = logged[-1]
    for k in range(2):
        shares = [last[f"s{k}/teacher_share/{c}"] for c in range(4)]
        assert sum(shares) == pytest.approx(1.0) and last[f"s{k}/loss_ss"] > 0
    assert sum(last[f"data/click_share/{c}"] for c in range(4)) == pytest.approx(1.0)
    assert last["epoch"] == pytest.approx(3 * 4 / 4)  # 4 of 16 images clicked, 4 a step


@pytest.mark.slow  # four training processes, two at a time
def test_label_efficiency_study_prints_the_table_saves_the_plot_and_resumes(tmp_path):
    """scripts/label_efficiency.py, as a user runs it: one process per run (--jobs 2), the
    table, the plot; run again, it trains nothing and prints the same table."""
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    flags = [a for s in [*TINY, "optim.steps=2", "schedule.eval_every=2", "schedule.checkpoint_every=2"]
             for a in ("--set", s)]
    command = [sys.executable, "scripts/label_efficiency.py", "--config", "jobs/configs/synthetic.yaml",
               "--clicked", "4", "16", "--rows", "seminar", "fixmatchish",
               "--row", "fixmatchish=method.tau=0.95|method.cutmix_prob=1", "--jobs", "2", "--out", str(tmp_path),
               *flags]
    first = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = re.findall(r"^\| (4|16) \| (\d+) \| (0\.\d{3}) \| (0\.\d{3}) \| - \|$", first.stdout, re.M)
    assert [r[0] for r in rows] == ["4", "16"] and int(rows[0][1]) < int(rows[1][1]), first.stdout
    assert (tmp_path / "label_efficiency.png").stat().st_size > 10_000
    assert first.stdout.count(": done") == 4
    spec = json.loads(next((tmp_path / "seminar-c4-s0").glob("checkpoints/*/meta.json")).read_text())["spec"]
    assert spec["data"]["clicked_images"] == 4 and spec["method"]["w_ts"] > 0
    spec = json.loads(next((tmp_path / "fixmatchish-c16-s0").glob("checkpoints/*/meta.json")).read_text())["spec"]
    assert spec["data"]["clicked_images"] is None and spec["method"]["cutmix_prob"] == 1  # 16 = every image
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and ": done" not in again.stdout
    assert re.findall(r"^\| (?:4|16) \|.*$", again.stdout, re.M) == re.findall(r"^\| (?:4|16) \|.*$", first.stdout, re.M)


def test_training_threads_fit_the_cpus_the_process_may_use(monkeypatch, tmp_path):
    import os

    import seminar.engine as engine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(engine, "CGROUP_CPU_MAX", cpu_max)
    assert engine.usable_cpus() == 8  # no cgroup file: the affinity
    cpu_max.write_text("max 100000\n")
    assert engine.usable_cpus() == 8
    cpu_max.write_text("250000 100000\n")  # a container's 2.5 CPUs
    assert engine.usable_cpus() == 2
    cpu_max.write_text("50000 100000\n")
    assert engine.usable_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's allotment to a worker of one CPU
    cpu_max.write_text("max 100000\n")
    assert engine.usable_cpus() == 1


@pytest.mark.parametrize("given, expected", [(None, "passive"), ("active", "active")])
def test_the_command_makes_openmp_wait_passively_unless_told_otherwise(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    out = subprocess.run([sys.executable, "-c", "import jobs.main, os, torch; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == [expected], out.stderr
