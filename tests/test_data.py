"""The data layer against real files: VOC photos and What's the Point clicks, CamVid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
from PIL import Image
from typer.testing import CliRunner

from seminar.config import AugmentConfig, DataConfig
from seminar.data import (
    IGNORE_INDEX,
    ClickFileError,
    DatasetError,
    Sample,
    SeminarViews,
    build_dataset,
    clicks_by_image,
    empty_image_ids,
    inspect_clicks,
    load_clicks,
    make_click_table,
    rasterize_clicks,
    read_click_table,
    read_wtp_json,
    simulate_clicks,
    validate_clicks,
    write_click_table,
)
from seminar.cli import data_app
from seminar.data.transforms import draw_geometry

DATA = Path(__file__).parent / "data"
VOC = DATA / "voc_tiny"
CAMVID = DATA / "camvid_tiny"
WTP_MAIN = Path(__file__).parents[2] / "shared" / "data" / "voc" / "whats_the_point" / "pascal2012_trainval_main.json"


def voc_config(**changes) -> DataConfig:
    return DataConfig(dataset="voc", root=str(VOC), clicks=str(VOC / "points_main.json"), **changes)


@pytest.fixture(scope="module")
def voc_train():
    return build_dataset(voc_config(simulate_background=False), "train")


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def views(seed: int = 0, radius: int = 0) -> SeminarViews:
    augments = [AugmentConfig(), AugmentConfig(color_jitter=0.3, hue=0.05)]
    return SeminarViews((128, 128), (0.6, 1.6), radius, augments, seed)


# --- VOC with real clicks -------------------------------------------------------------


def test_voc_real_clicks_land_on_their_class(voc_train):
    assert voc_train.info.num_classes == 21 and voc_train.info.click_source == "wtp_main"
    assert len(voc_train) == 6 and voc_train.click_fit.dropped == 0
    on_class = total = 0
    for sample in voc_train:
        assert sample.image.shape[:2] == sample.mask.shape
        for x, y, c in sample.clicks:
            on_class += sample.mask[round(y), round(x)] == c
            total += 1
    # Human clicks: most land on their class (about 90% on the full set), never all.
    real = json.loads((VOC / "points_main.json").read_text())
    assert total == sum(len(real[i]) for i in voc_train.image_ids) == 36
    assert on_class / total >= 0.8


def test_voc_background_clicks_are_simulated_and_labelled():
    dataset = build_dataset(voc_config(extra_clicks=[str(VOC / "points_supp.json")]), "val")
    assert dataset.info.click_source == "wtp_main+wtp_supp+simulated_bg_from_gt"
    sample = dataset[0]
    background = sample.clicks[sample.clicks[:, 2] == 0]
    assert len(background) >= 1
    assert all(sample.mask[int(y), int(x)] == 0 for x, y, _ in background)


def test_voc_without_click_file_simulates_every_click():
    dataset = build_dataset(DataConfig(dataset="voc", root=str(VOC), max_val=1), "val")
    assert dataset.info.click_source == "simulated"
    sample = dataset[0]
    assert {int(c) for c in sample.clicks[:, 2]} == set(np.unique(sample.mask).tolist()) - {IGNORE_INDEX}


def test_detection_only_image_has_no_mask(tmp_path):
    # A devkit whose split lists 2007_000027, which has a photo but no segmentation.
    (tmp_path / "JPEGImages").symlink_to((VOC / "JPEGImages").absolute())
    (tmp_path / "SegmentationClass").symlink_to((VOC / "SegmentationClass").absolute())
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000027\n2007_000033\n")
    cfg = DataConfig(dataset="voc", root=str(tmp_path), clicks=str(VOC / "points_main.json"))
    dataset = build_dataset(cfg, "val")
    detection_only, segmented = dataset[0], dataset[1]
    assert detection_only.image_id == "2007_000027" and detection_only.mask is None
    assert detection_only.image.shape == (500, 486, 3) and len(detection_only.clicks) == 0
    assert segmented.mask is not None
    out = views()(detection_only, epoch=0, index=0, students=[0])
    assert (out["mask"] == IGNORE_INDEX).all()


def test_sbd_mask_used_when_segmentation_class_lacks_it(tmp_path):
    (tmp_path / "JPEGImages").symlink_to((VOC / "JPEGImages").absolute())
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000027\n")
    segmentation = np.zeros((500, 486), np.uint8)
    segmentation[100:300, 50:200] = 15
    (tmp_path / "sbd" / "dataset" / "cls").mkdir(parents=True)
    scipy.io.savemat(tmp_path / "sbd" / "dataset" / "cls" / "2007_000027.mat", {"GTcls": {"Segmentation": segmentation}})
    cfg = DataConfig(dataset="voc", root=str(tmp_path), sbd_root=str(tmp_path / "sbd"), train_split="train_aug")
    sample = build_dataset(cfg, "train")[0]
    assert np.array_equal(sample.mask, segmentation)


def test_load_scale_resizes_image_mask_and_clicks(voc_train):
    half = build_dataset(voc_config(simulate_background=False, load_scale=0.5), "train")
    full, small = voc_train[0], half[0]
    assert small.image.shape[:2] == small.mask.shape == (round(281 * 0.5), 250)
    scale = np.array([250 / 500, 140 / 281])  # per axis: 281 rows round to 140
    assert np.allclose(small.clicks[:, :2], (full.clicks[:, :2] + 0.5) * scale - 0.5, atol=0.01)
    assert np.array_equal(small.clicks[:, 2], full.clicks[:, 2])


# --- CamVid and synthetic -------------------------------------------------------------


def test_camvid_void_becomes_ignore_and_clicks_are_simulated():
    dataset = build_dataset(DataConfig(dataset="camvid", root=str(CAMVID)), "train")
    assert len(dataset) == 2 and dataset.info.num_classes == 11 and dataset.info.click_source == "simulated"
    raw = np.array(Image.open(CAMVID / "trainannot" / "0001TP_006690.png"))
    sample = dataset[0]
    assert (raw == 11).any()
    assert (sample.mask[raw == 11] == IGNORE_INDEX).all() and not (sample.mask == 11).any()
    assert len(sample.clicks) > 5
    assert all(sample.mask[int(y), int(x)] == c for x, y, c in sample.clicks)
    assert build_dataset(DataConfig(dataset="camvid", root=str(CAMVID)), "val").image_ids == ["0016E5_07959"]


def test_camvid_extra_clicks_add_to_the_simulated_ones_and_a_click_table_replaces_them(tmp_path):
    # a correction in original pixels (480x360) on a train image; the val image is known too
    extra = tmp_path / "corrections.parquet"
    write_click_table(make_click_table(["0001TP_006690", "0016E5_07959"], [101.0, 5.0], [51.0, 5.0], [3, 0], [1, 1],
                                       source="user"), str(extra))
    scale = dict(dataset="camvid", root=str(CAMVID), load_scale=0.5)
    simulated = build_dataset(DataConfig(**scale), "train")[0].clicks
    both = build_dataset(DataConfig(**scale, extra_clicks=[str(extra)]), "train")
    assert both.info.click_source == "simulated+user"
    assert np.array_equal(both[0].clicks[:-1], simulated)
    assert np.allclose(both[0].clicks[-1], [50.25, 25.25, 3])  # pixel centres: (101 + 0.5) / 2 - 0.5
    only = build_dataset(DataConfig(**scale, clicks=str(extra)), "train")
    assert only.info.click_source == "user" and len(only[0].clicks) == 1 and len(only[1].clicks) == 0
    unknown = tmp_path / "unknown.parquet"
    write_click_table(make_click_table(["no_such_image"], [1.0], [1.0], [0], [1], source="user"), str(unknown))
    with pytest.raises(ClickFileError, match="no_such_image"):
        build_dataset(DataConfig(**scale, extra_clicks=[str(unknown)]), "train")


def test_synthetic_is_deterministic_and_splits_differ():
    cfg = DataConfig(synthetic={"num_train": 4, "num_val": 2, "image_size": 64, "num_classes": 5})
    a, b = build_dataset(cfg, "train")[3], build_dataset(cfg, "train")[3]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.clicks, b.clicks)
    assert not np.array_equal(build_dataset(cfg, "val")[0].image, build_dataset(cfg, "train")[0].image)
    assert a.image.shape == (64, 64, 3) and set(np.unique(a.mask)) <= set(range(5))
    assert build_dataset(cfg, "train").info.click_source == "simulated"
    assert all(a.mask[int(y), int(x)] == c for x, y, c in a.clicks) and (a.clicks[:, 2] == 0).any()


# --- Views ------------------------------------------------------------------------------


def test_click_stays_on_its_object_through_scale_crop_and_flip(voc_train):
    original = voc_train[3]
    # Simulated clicks of large regions sit well inside them, so every click must match.
    clicks = simulate_clicks(original.mask, 21, min_area=200, seed=0)
    sample = Sample(original.image_id, original.image, original.mask, clicks)
    assert all(sample.mask[int(y), int(x)] == c for x, y, c in clicks)
    height, width = sample.mask.shape
    geometries = [draw_geometry(np.random.default_rng([0, e, 3]), height, width, (128, 128), (0.6, 1.6)) for e in range(8)]
    assert {g.flip for g in geometries} == {True, False}
    assert min(g.size[0] for g in geometries) < height < max(g.size[0] for g in geometries)
    compared = 0
    for epoch in range(8):
        out = views()(sample, epoch=epoch, index=3, students=[])
        click_map, mask = out["click_map"].numpy(), out["mask"].numpy()
        for row, col in zip(*np.nonzero(click_map != IGNORE_INDEX)):
            assert click_map[row, col] == mask[row, col]
            compared += 1
    assert compared >= 8


def test_image_pixels_move_with_their_click():
    # A white square and its click: after any geometry the click lands on white pixels.
    image = np.zeros((80, 120, 3), np.uint8)
    mask = np.zeros((80, 120), np.uint8)
    image[30:50, 80:100], mask[30:50, 80:100] = 255, 1
    sample = Sample("square", image, mask, np.array([[89.0, 39.0, 1.0]], np.float32))
    transform = SeminarViews((64, 64), (0.5, 2.0), 0, [AugmentConfig()], seed=3)
    seen = 0
    for epoch in range(12):
        out = transform(sample, epoch, 0, students=[0])
        rows, cols = np.nonzero(out["click_map"].numpy() == 1)
        if len(rows):
            seen += 1
            assert out["mask"][rows[0], cols[0]] == 1
            assert out["image_weak"][:, rows[0], cols[0]].min() > 2  # white, normalised
    assert seen >= 3


def test_same_geometry_in_two_processes_and_different_strong_views(voc_train):
    sample = voc_train[1]
    first = views(seed=7)(sample, epoch=2, index=11, students=[0, 1])
    second = views(seed=7)(sample, epoch=2, index=11, students=[1])  # another machine, student 1 only
    for key in ("image_weak", "click_map", "mask", "valid"):
        assert torch.equal(first[key], second[key]), key
    assert torch.equal(first["image_strong"][1], second["image_strong"][0])
    assert first["image_strong"].shape == (2, 3, 128, 128)
    assert not torch.allclose(first["image_strong"][0], first["image_strong"][1])
    other_epoch = views(seed=7)(sample, epoch=3, index=11, students=[0])
    assert not torch.equal(first["mask"], other_epoch["mask"])
    assert first["click_map"].dtype == first["mask"].dtype == torch.int64


def test_padding_is_invalid_and_ignored():
    image = np.full((40, 50, 3), 128, np.uint8)
    sample_mask = np.ones((40, 50), np.uint8)
    out = SeminarViews((96, 96), (1.0, 1.0), 1, [AugmentConfig()], 0)(Sample("s", image, sample_mask), 0, 0, [0])
    assert out["valid"].sum() == 40 * 50
    assert (out["mask"][~out["valid"]] == IGNORE_INDEX).all() and (out["mask"][out["valid"]] == 1).all()
    assert (out["image_weak"][:, ~out["valid"]] == 0).all() and (out["image_strong"][0][:, ~out["valid"]] == 0).all()


def test_eval_views_are_the_full_image(voc_train):
    sample = voc_train[0]
    out = views(radius=2)(sample, epoch=0, index=0, students=[0, 1], train=False)
    assert "image_strong" not in out
    assert out["image_weak"].shape == (3, 281, 500) and out["mask"].shape == (281, 500) and out["valid"].all()
    assert torch.equal(out["mask"], torch.from_numpy(sample.mask.astype(np.int64)))


def test_rasterize_clicks_disks_and_radius():
    clicks = np.array([[10.0, 5.0, 3.0], [0.4, 0.4, 7.0], [200.0, 5.0, 1.0]], np.float32)
    single = rasterize_clicks(clicks, 20, 30, radius=0)
    assert single.dtype == np.uint8 and single[5, 10] == 3 and single[0, 0] == 7
    assert (single != IGNORE_INDEX).sum() == 2  # the click off the canvas is not drawn
    disk = rasterize_clicks(clicks[:1], 20, 30, radius=2)
    assert (disk == 3).sum() == 13  # the 13 pixels within distance 2
    assert disk[5, 12] == 3 and disk[5, 13] == IGNORE_INDEX and disk[7, 12] == IGNORE_INDEX
    corner = rasterize_clicks(clicks[1:2], 20, 30, radius=2)
    assert (corner == 7).sum() == 6  # the disk is cut by the canvas edge


# --- Simulated clicks -------------------------------------------------------------------


def test_simulated_clicks_one_per_component_inside_and_deterministic():
    mask = np.zeros((60, 60), np.uint8)
    mask[5:20, 5:20] = 1  # component of class 1
    mask[40:55, 30:58] = 1  # another
    mask[30:32, 5:7] = 1  # 4 px: below min_area
    mask[25:45, 5:25] = 2
    mask[0:3, 40:60] = IGNORE_INDEX
    clicks = simulate_clicks(mask, num_classes=3, min_area=16, seed=5)
    assert sorted(clicks[:, 2].tolist()) == [0, 1, 1, 2]
    assert all(mask[int(y), int(x)] == c for x, y, c in clicks)
    # Toward the interior: the 15x15 square's click is at least 4 px from its edge.
    x, y, _ = clicks[(clicks[:, 2] == 1) & (clicks[:, 1] < 25)][0]
    assert 9 <= x <= 15 and 9 <= y <= 15
    assert np.array_equal(clicks, simulate_clicks(mask, 3, 16, seed=5))
    assert len(simulate_clicks(mask, 3, 16, seed=5, classes=[0])) == 1
    # a click budget of one per class: the larger square (15x28) keeps its click, the other not
    budget = simulate_clicks(mask, 3, 16, seed=5, per_class=1)
    assert sorted(budget[:, 2].tolist()) == [0, 1, 2]
    x, y, _ = budget[budget[:, 2] == 1][0]
    assert 40 <= y < 55 and 30 <= x < 58
    assert all(any(np.array_equal(b, c) for c in clicks) for b in budget)  # the same clicks, fewer

    # radius: the whole disk lies on the component; too thin for it: no click
    thin = np.zeros((40, 40), np.uint8)
    thin[5:35, 10:13] = 1  # a 3-px pole: its centre line is 2 px from the edge
    thin[5:35, 20:27] = 2  # a 7-px one: room for a radius-2 disk
    clicks = simulate_clicks(thin, 3, 16, seed=0, radius=2)
    assert sorted(clicks[:, 2].tolist()) == [0, 2]
    assert len(simulate_clicks(thin, 3, 16, seed=0, radius=1)) == 3


def test_camvid_click_purity_at_the_study_scale():
    """Clicks simulated at the loaded resolution, drawn as the study draws them (half
    resolution, radius 2): at least 95% of click-disk pixels on their own class (it was 65.5%
    when clicks were simulated at full resolution and then shrunk)."""
    cfg = DataConfig(dataset="camvid", root=str(CAMVID), load_scale=0.5, click_radius=2)
    on = total = 0
    for split in ("train", "val"):
        dataset = build_dataset(cfg, split)
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample.image.shape[:2] == sample.mask.shape == (180, 240)
            disks = rasterize_clicks(sample.clicks, 180, 240, cfg.click_radius)
            drawn = disks != IGNORE_INDEX
            on += int((disks[drawn] == sample.mask[drawn]).sum())
            total += int(drawn.sum())
    assert total > 200
    assert on / total >= 0.95, on / total


# --- Click files ------------------------------------------------------------------------


def test_wtp_reader_and_parquet_round_trip(tmp_path):
    table = read_wtp_json(str(VOC / "points_main.json"), "wtp_main")
    raw = json.loads((VOC / "points_main.json").read_text())
    assert table.num_rows == sum(len(v) for v in raw.values())
    assert table.schema.types == [pa.string(), pa.float32(), pa.float32(), pa.int16(), pa.int16(), pa.string()]
    first = raw["2007_000032"][0]
    assert np.allclose(clicks_by_image(table)["2007_000032"][0], [first["x"], first["y"], first["cls"]])
    assert set(table["source"].to_pylist()) == {"wtp_main"}

    with_empty = read_wtp_json(write_json(tmp_path / "e.json", {"a": [], "b": [{"x": 1, "y": 2, "cls": 3, "rank": 1}]}), "user")
    assert empty_image_ids(with_empty) == ["a"] and len(clicks_by_image(with_empty)["a"]) == 0

    write_click_table(with_empty, str(tmp_path / "clicks.parquet"))
    back = load_clicks(str(tmp_path / "clicks.parquet"))
    assert back.equals(with_empty) and empty_image_ids(back) == ["a"]
    assert load_clicks(str(VOC / "points_supp.json"))["source"][0].as_py() == "wtp_supp"


def test_click_table_round_trip_through_s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test extra")
    import pyarrow.fs as pafs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # moto's fake credentials
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = f"endpoint_override=http://{host}:{port}&scheme=http&region=us-east-1"
        pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("clicks")  # fmt: skip
        table = read_wtp_json(str(VOC / "points_main.json"), "wtp_main")
        write_click_table(table, f"s3://clicks/voc/points.parquet?{options}")
        assert load_clicks(f"s3://clicks/voc/points.parquet?{options}").equals(table)
    finally:
        server.stop()


def test_user_parquet_with_pandas_types_is_cast(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "x": [1.5], "y": [2.0], "cls": [2]}), tmp_path / "u.parquet")
    table = read_click_table(str(tmp_path / "u.parquet"))
    assert table.schema.field("cls").type == pa.int16() and table["source"].to_pylist() == ["user"]
    assert table["rank"].to_pylist() == [1]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"img1": [{"x": 1, "y": 2, "cls": 3, "rank": 1}, {"x": 1, "y": 2, "rank": 1}]}',
         ["bad.json", "image 'img1'", "click 1", "field 'cls'", "missing"]),
        ('{"img1": [{"x": "abc", "y": 2, "cls": 3, "rank": 1}]}',
         ["bad.json", "image 'img1'", "click 0", "field 'x'", "'abc'"]),
        ('{"img1": [{"x": 1, "y": 2, "cls": 1.5, "rank": 1}]}', ["image 'img1'", "field 'cls'", "integer"]),
        ('{"img1": [{"x": 1, "y": 2, "cls": 3, "rank": 1}', ["bad.json", "not valid JSON"]),
        ('{"img1": {"x": 1}}', ["bad.json", "image 'img1'", "list of clicks"]),
    ],
)  # fmt: skip
def test_bad_wtp_json_names_file_image_click_and_field(tmp_path, content, expected):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ClickFileError) as error:
        load_clicks(str(tmp_path / "bad.json"))
    for part in expected:
        assert part in str(error.value)


def test_unknown_class_and_unknown_image_are_named():
    table = make_click_table(["a", "b", "b"], [1, 2, 3], [1, 2, 3], [1, 4, 25], [1, 1, 2], "user")
    with pytest.raises(ClickFileError, match=r"clicks.parquet, image 'b', click 1, field 'cls': class 25 .* 21 classes"):
        validate_clicks(table, 21, path="clicks.parquet")
    with pytest.raises(ClickFileError, match=r"clicks.parquet: 1 image id\(s\) not in the dataset, e.g. 'b'"):
        validate_clicks(table, 30, image_ids={"a"}, path="clicks.parquet")


def test_unknown_click_class_stops_the_voc_dataset(tmp_path):
    clicks = json.loads((VOC / "points_main.json").read_text())
    clicks["2007_000039"][0]["cls"] = 21
    path = write_json(tmp_path / "points.json", clicks)
    with pytest.raises(ClickFileError, match=r"points.json, image '2007_000039', click 0, field 'cls': class 21"):
        build_dataset(DataConfig(dataset="voc", root=str(VOC), clicks=path), "train")
    clicks["2099_000001"] = clicks.pop("2007_000039")
    clicks["2099_000001"][0]["cls"] = 1
    with pytest.raises(ClickFileError, match=r"points.json: 1 image id\(s\) not in the dataset, e.g. '2099_000001'"):
        build_dataset(DataConfig(dataset="voc", root=str(VOC), clicks=write_json(tmp_path / "points.json", clicks)), "train")


def test_parquet_schema_errors_name_the_column(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "x": ["left"], "y": [1.0], "cls": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ClickFileError, match=r"t.parquet: column 'x' has type string, expected float"):
        read_click_table(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"image_id": ["a"], "x": [1.0], "cls": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ClickFileError, match=r"t.parquet: column 'y' is missing"):
        read_click_table(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"image_id": ["a", "b"], "x": [1.0, 2.0], "y": [1.0, None], "cls": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(ClickFileError, match=r"t.parquet, image 'b', click 0, field 'y': null value \(row 1\)"):
        read_click_table(str(tmp_path / "t.parquet"))


def test_missing_image_file_is_named(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    with pytest.raises(DatasetError, match=r"JPEGImages/2007_000032.jpg: image not found"):
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "train")


def test_unexpected_mask_value_names_file_and_pixel(tmp_path):
    (tmp_path / "JPEGImages").symlink_to((VOC / "JPEGImages").absolute())
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    mask = np.array(Image.open(VOC / "SegmentationClass" / "2007_000033.png"))
    mask[3, 5] = 30
    broken = Image.fromarray(mask, mode="P")
    broken.putpalette(Image.open(VOC / "SegmentationClass" / "2007_000033.png").getpalette())
    broken.save(tmp_path / "SegmentationClass" / "2007_000033.png")
    with pytest.raises(DatasetError, match=r"2007_000033.png: unexpected mask value 30 at pixel \(row 3, col 5\)"):
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path)), "val")


def test_folder_dataset_clips_and_drops_stray_clicks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "cat.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "dog.jpg")
    Image.fromarray(np.ones((30, 40), np.uint8)).save(tmp_path / "masks" / "cat.png")
    table = make_click_table(
        ["cat", "cat", "cat", "dog"], [5.0, 39.6, 70.0, 3.0], [5.0, -0.5, 3.0, 4.0], [1, 1, 1, 2], [1, 2, 3, 1], "user"
    )
    write_click_table(table, str(tmp_path / "clicks.parquet"))
    cfg = DataConfig(dataset="folder", root=str(tmp_path), clicks=str(tmp_path / "clicks.parquet"),
                     classes=["background", "cat", "dog"])  # fmt: skip
    dataset = build_dataset(cfg, "train")
    assert dataset.image_ids == ["cat", "dog"] and dataset.info.click_source == "user"
    assert (dataset.click_fit.clipped, dataset.click_fit.dropped) == (1, 1)
    cat, dog = dataset[0], dataset[1]
    assert np.allclose(cat.clicks, [[5, 5, 1], [39, 0, 1]]) and dog.mask is None
    with pytest.raises(ClickFileError, match=r"field 'cls': class 2 is outside the dataset's 2 classes"):
        build_dataset(cfg.model_copy(update={"classes": ["background", "cat"]}), "train")


# --- Inspect ----------------------------------------------------------------------------


def test_inspect_counts_classes_empty_lists_and_clicks_off_the_image(tmp_path):
    clicks = json.loads((VOC / "points_main.json").read_text())
    clicks["2007_000032"].append({"x": -0.5, "y": 10.0, "cls": 1, "rank": 3})
    clicks["2007_000033"].append({"x": 520.0, "y": 10.0, "cls": 1, "rank": 4})
    clicks["2008_000001"] = []
    clicks["2007_000032"].append(dict(clicks["2007_000032"][0]))  # the same click twice
    path = write_json(tmp_path / "points.json", clicks)
    report = inspect_clicks(path, masks_dir=str(VOC / "SegmentationClass"))
    assert report.num_images == 8 and report.empty_images == ["2008_000001"]
    assert report.num_clicks == sum(len(v) for v in clicks.values())
    assert report.class_names[15] == "person" and report.clicks_per_class[1] == 8  # 7 + the duplicate
    assert (report.negative_clicks, report.beyond_image_clicks, report.size_checked_images) == (1, 1, 7)
    assert (report.clipped_on_load, report.dropped_on_load) == (1, 1)
    assert report.duplicate_clicks == 1
    assert report.sources == ["wtp_main"]

    result = CliRunner().invoke(data_app, ["inspect", path, "--masks", str(VOC / "SegmentationClass")])
    assert result.exit_code == 0, result.output
    assert "person" in result.output and "size-checked" in result.output and "duplicate clicks" in result.output
    result = CliRunner().invoke(data_app, ["inspect", str(tmp_path / "nothing.json")])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.skipif(not WTP_MAIN.is_file(), reason=f"the real What's the Point file is not at {WTP_MAIN}")
def test_inspect_real_whats_the_point_main_file():
    report = inspect_clicks(str(WTP_MAIN))
    assert report.num_images == 12_180 and report.num_clicks == 32_697
    assert len(report.empty_images) == 20 and report.sources == ["wtp_main"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_click_store_parts_from_concurrent_writers_lose_nothing_and_train_reads_them(where, tmp_path, request):
    """The endpoint's correction clicks: each writer adds a Parquet part; a folder dataset
    with data.clicks = the store reads every click."""
    import concurrent.futures

    from seminar.data.clicks import append_clicks

    store = str(tmp_path / "clicks") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/clicks"

    def writer(w: int) -> None:
        for i in range(10):
            append_clicks(store, make_click_table(["cat"], [float(w)], [float(i)], [1], [1], "user"))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(writer, range(4)))
    table = load_clicks(store)
    assert table.num_rows == 40 and set(table["source"].to_pylist()) == {"user"}
    assert sorted(zip(table["x"].to_pylist(), table["y"].to_pylist())) == [(w, i) for w in range(4) for i in range(10)]
    if where == "local":
        (tmp_path / "images").mkdir()
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "cat.png")
        dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), clicks=store,
                                           classes=["background", "cat"]), "train")
        assert len(dataset[0].clicks) == 40 and dataset.info.click_source == "user"
        (tmp_path / "empty").mkdir()
        with pytest.raises(ClickFileError, match="a folder without .parquet click tables"):
            load_clicks(str(tmp_path / "empty"))
        with pytest.raises(ClickFileError, match="no such click file or folder"):
            load_clicks(str(tmp_path / "missing"))


# --- Clicked and unclicked images ------------------------------------------------------


def test_clicked_images_keeps_a_nested_seeded_subset_and_the_rest_lose_their_clicks():
    cfg = DataConfig(synthetic={"num_train": 40}, click_seed=3)
    subsets = {n: set(np.flatnonzero(build_dataset(cfg.model_copy(update={"clicked_images": n}), "train").clicked))
               for n in (4, 10, 40)}
    assert [len(s) for s in subsets.values()] == [4, 10, 40] and subsets[4] < subsets[10] < subsets[40]
    fraction = build_dataset(cfg.model_copy(update={"clicked_images": 0.25}), "train")
    assert set(np.flatnonzero(fraction.clicked)) == subsets[10]  # a quarter of 40: the same 10
    other_seed = build_dataset(cfg.model_copy(update={"clicked_images": 10, "click_seed": 4}), "train")
    assert set(np.flatnonzero(other_seed.clicked)) != subsets[10]
    dataset = build_dataset(cfg.model_copy(update={"clicked_images": 4}), "train")
    for i in range(10):
        assert (len(dataset[i].clicks) > 0) == (i in subsets[4]), i
    # validation images keep their clicks (they are not trained on)
    assert build_dataset(cfg.model_copy(update={"clicked_images": 4}), "val").clicked.all()
    with pytest.raises(DatasetError, match=r"data.clicked_images: 41 asked for, but only 40 of the 40 training images"):
        build_dataset(cfg.model_copy(update={"clicked_images": 41}), "train")


@pytest.mark.parametrize("value", [0, -3, 0.0, 1.5, True])
def test_clicked_images_must_be_a_count_or_a_fraction(value):
    with pytest.raises(ValueError, match="clicked_images"):
        DataConfig(clicked_images=value)


def test_folder_images_absent_from_the_click_table_are_unclicked(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
    write_click_table(make_click_table(["b"], [5.0], [5.0], [1], [1], "user"), str(tmp_path / "clicks.parquet"))
    cfg = DataConfig(dataset="folder", root=str(tmp_path), clicks=str(tmp_path / "clicks.parquet"), classes=["bg", "x"])
    assert build_dataset(cfg, "train").clicked.tolist() == [False, True, False]
