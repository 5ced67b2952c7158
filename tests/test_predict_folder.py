"""`seminar predict`: label maps and one table for a folder or an S3 prefix, resumable, with
where the teachers disagree (serving.predict_folder)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from jobs.main import app
from seminar import storage
from serving.committee import DISAGREE_LEVEL, Committee, disagreement_map, suggest_clicks
from serving.predict_folder import TABLE, predict_folder

DATA = Path(__file__).parent / "data"
PHOTOS = sorted((DATA / "voc_tiny" / "JPEGImages").glob("*.jpg"))
runner = CliRunner()


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """An untrained two-student checkpoint (the default students: ResNet-18 and MobileNetV2)."""
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    directory = tmp_path_factory.mktemp("predict") / "checkpoint"
    cfg = load_spec(None, ["storage.run_name=predict-test", "serving.infer_size=128", "method.inference=teacher_ensemble"])
    return write_initial_checkpoint(str(directory), cfg)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in PHOTOS[:5]:
        shutil.copy(path, folder)
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def table(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, TABLE)))).to_pylist()


def test_disagreement_is_zero_where_teachers_agree_and_high_where_they_differ():
    agree = torch.zeros(3, 8, 8)
    agree[1] = 1.0
    split = agree.clone()
    split[:, :, 4:] = 0
    split[2, :, 4:] = 1.0  # the right half: the second teacher is sure of another class
    d = disagreement_map([agree, split])
    assert d[:, :4].max().item() == pytest.approx(0, abs=1e-5)
    assert d[:, 4:].min().item() == pytest.approx(1, abs=1e-3)  # sure of different classes: the ceiling
    soft = torch.full((3, 8, 8), 1 / 3)
    assert 0 < disagreement_map([agree, soft]).mean().item() < 1  # one sure, one unsure: in between
    # suggestions: inside the disagreeing regions, the larger one first
    field = np.zeros((40, 60), np.float32)
    field[5:15, 5:15] = 0.9  # 100 px
    field[20:38, 30:58] = 0.5  # 504 px: more summed disagreement
    field[0:2, 50:52] = 0.9  # 4 px: too small for a click
    clicks = suggest_clicks(field, 5)
    assert len(clicks) == 2 and field[clicks[0][1], clicks[0][0]] == 0.5 and field[clicks[1][1], clicks[1][0]] == 0.9
    assert clicks[0][2] > clicks[1][2]
    assert suggest_clicks(np.full((10, 10), DISAGREE_LEVEL / 2, np.float32), 3) == []


def test_committee_serves_the_same_probabilities_as_the_network_alone(two_teachers):
    """Suggestions on or off, the served answer is the same: the probabilities at the networks'
    output resolution (restore_size takes them to the image's), the disagreement at the input size."""
    from serving.batching import predict_batch

    committee = Committee.load(two_teachers, None, "torch", 1)
    tensors = [torch.rand(3, 96, 128), torch.rand(3, 128, 80)]
    alone = predict_batch(committee.served.predict_probs, tensors)
    for (probs, disagreement), expected, t in zip(committee(tensors), alone, tensors):
        assert probs.shape == expected.shape and probs.shape[-2:] != t.shape[-2:]
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
        assert disagreement.shape == t.shape[-2:]


def test_predict_folder_writes_label_maps_and_a_table_and_resumes(two_teachers, photos, tmp_path):
    out = tmp_path / "out"
    committee = Committee.load(two_teachers, None, "torch", 1)
    assert committee.served.which == "teacher_ensemble" and len(committee.members) == 2

    class Interrupt(Exception):
        pass

    class StopAfterFirstBatch:  # as Ctrl-C after the first batch
        def __init__(self, total):
            assert total == 5

        def update(self, n):
            raise Interrupt

    with pytest.raises(Interrupt):
        predict_folder(committee, str(photos), str(out), batch_size=2, progress=StopAfterFirstBatch)
    assert sorted(p.name for p in out.iterdir()) == [f"{p.stem}.png" for p in PHOTOS[:2]]
    (out / f"{PHOTOS[1].stem}.png").write_bytes((out / f"{PHOTOS[1].stem}.png").read_bytes()[:100])  # cut short
    summary = predict_folder(committee, str(photos), str(out), batch_size=2)
    assert (summary["skipped"], summary["written"], summary["failed"]) == (1, 4, [])  # the cut one redone
    rows = table(str(out))
    assert [r["image"] for r in rows] == [p.name for p in PHOTOS[:5]]
    for row, path in zip(rows, PHOTOS):
        label_map = Image.open(out / row["label_map"])
        original = Image.open(path)
        assert label_map.mode == "P" and label_map.size == original.size == (row["width"], row["height"])
        labels = np.asarray(label_map)
        shares = {c["id"]: c["share"] for c in row["classes"]}
        assert set(shares) == set(np.unique(labels).tolist())
        assert sum(shares.values()) == pytest.approx(1, abs=1e-5)
        assert 0 <= row["disagreement"] <= 1 and row["model_version"] == "predict-test@0"
        for click in row["suggested_clicks"]:
            assert 0 <= click["x"] < row["width"] and 0 <= click["y"] < row["height"]
    # the same command again: nothing left to do, the table unchanged
    again = predict_folder(committee, str(photos), str(out), batch_size=2)
    assert (again["skipped"], again["written"]) == (5, 0) and table(str(out)) == rows


def test_predict_command_over_s3_and_its_refusals(two_teachers, photos, tmp_path, s3_bucket):
    source, out = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/predictions"
    storage.upload_dir(photos, source)
    result = runner.invoke(app, ["predict", two_teachers, source, "--out", out, "--runtime", "torch", "--suggest", "2"])
    assert result.exit_code == 0, result.output
    assert "5 label maps written" in result.output and "2 teachers disagree" in result.output
    rows = table(out)
    assert len(rows) == 5 and all(len(r["suggested_clicks"]) <= 2 for r in rows)
    assert storage.exists(storage.join(out, f"{PHOTOS[0].stem}.png"))

    (photos / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:300])
    partly = runner.invoke(app, ["predict", two_teachers, str(photos), "--out", str(tmp_path / "o"), "--runtime", "torch"])
    assert partly.exit_code == 1 and "broken.jpg" in partly.output and "5 label maps written" in partly.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (photos / f"{PHOTOS[0].stem}.png").write_bytes(b"x")
    for args, message in [([str(empty)], "no .jpg, .jpeg or .png files"),
                          ([str(tmp_path / "missing")], "no such directory"),
                          ([str(photos)], "would both be written as"),
                          ([str(tmp_path / "o"), "--out", str(tmp_path / "o")], "--out must differ from INPUT")]:
        command = ["predict", two_teachers, *args] + ([] if "--out" in args else ["--out", str(tmp_path / "x")])
        refused = runner.invoke(app, command + ["--runtime", "torch"])
        assert refused.exit_code == 2 and message in refused.output, (args, refused.output)
