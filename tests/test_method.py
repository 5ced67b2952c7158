"""The method's pieces: EMA teacher, losses, pseudo-label fusion, mIoU."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from seminar.config import MethodConfig, SpecError, load_spec
from seminar.exchange import CompactPrediction, InProcessExchange
from seminar.method import EmaTeacher, fuse_pseudo_labels, pairwise_affinity_loss, sigmoid_rampup, student_losses
from seminar.metrics import ConfusionMatrix


def test_ema_teacher_tracks_parameters_and_batchnorm_buffers():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = EmaTeacher(student, ema_decay=0.9, warmup_steps=10)
    student.train()
    student(torch.randn(8, 3, 8, 8) * 3 + 1)  # moves BatchNorm's running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    teacher.update(student, step=50)
    d = teacher.decay_at(50)
    assert d == pytest.approx(0.9)
    for name, value in teacher.module.state_dict().items():
        s = student.state_dict()[name]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, d * before[name] + (1 - d) * s)
        else:
            assert torch.equal(value, s)  # num_batches_tracked is copied
    assert not torch.equal(teacher.module[1].running_mean, before["1.running_mean"])
    assert teacher.module[1].num_batches_tracked.item() == 1
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_warmup_reaches_ema_decay_at_the_stated_step():
    teacher = EmaTeacher(nn.Linear(1, 1), ema_decay=0.999, warmup_steps=200)
    assert teacher.decay_at(0) == 0.0  # the first update copies the student
    assert teacher.decay_at(100) == pytest.approx(0.4995)  # linear in steps
    assert teacher.decay_at(199) < 0.999
    assert teacher.decay_at(200) == teacher.decay_at(10_000) == 0.999
    # Decays a sweep compares are different teachers from the warm-up on, in a short run too.
    short = [EmaTeacher(nn.Linear(1, 1), d, 100).decay_at(150) for d in (0.99, 0.999)]
    assert short == [0.99, 0.999]
    assert load_spec(None, []).method.ema_warmup_steps == 100
    assert EmaTeacher(nn.Linear(1, 1), 0.99, 0).decay_at(0) == 0.99  # no warm-up


def test_sigmoid_rampup():
    assert sigmoid_rampup(-1, 10) == 0.0
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def _batch(h=6, w=5, clicks=((1, 1, 2), (4, 3, 1))):
    click_map = torch.full((1, h, w), 255, dtype=torch.int64)
    for y, x, c in clicks:
        click_map[0, y, x] = c
    return {"click_map": click_map, "valid": torch.ones(1, h, w, dtype=torch.bool),
            "mask": torch.zeros(1, h, w, dtype=torch.int64)}


def test_loss_sup_sees_only_clicked_pixels():
    batch = _batch()
    logits = torch.randn(1, 3, 6, 5, requires_grad=True)
    cfg = MethodConfig(w_ts=0, w_ss=0)
    losses = student_losses(cfg, 100, logits, batch, None, None)
    losses["loss"].backward()
    touched = logits.grad.abs().sum(1)[0] > 0
    assert touched.nonzero().tolist() == [[1, 1], [4, 3]]
    expected = torch.nn.functional.cross_entropy(logits[0, :, [1, 4], [1, 3]].T, torch.tensor([2, 1]))
    assert losses["loss_sup"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_ts_uses_unclicked_valid_pixels_only():
    batch = _batch()
    batch["valid"][0, 0, :] = False  # a padded row
    logits = torch.randn(1, 3, 6, 5, requires_grad=True)
    teacher = torch.randn(1, 3, 6, 5).softmax(1)
    losses = student_losses(MethodConfig(w_ss=0, rampup_steps=0), 0, logits, batch, teacher, None)
    losses["loss_ts"].backward()
    touched = logits.grad.abs().sum(1)[0] > 0
    assert not touched[0].any() and not touched[1, 1] and not touched[4, 3]
    assert touched.sum() == 6 * 5 - 5 - 2


def _pred(labels, confs):
    return CompactPrediction(np.array(labels, np.uint8)[None], (np.array(confs) * 255).round().astype(np.uint8)[None])


def test_fusion_votes_thresholds_and_leaves_clicks_to_loss_sup():
    # pixels: agree-confident, agree-unsure, disagree, clicked, outside the image
    a = _pred([[1, 1, 1, 2, 1]], [[0.9, 0.5, 0.9, 0.9, 0.9]])
    b = _pred([[1, 1, 2, 2, 1]], [[0.8, 0.5, 0.9, 0.9, 0.9]])
    click_map = torch.tensor([[[255, 255, 255, 0, 255]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    cfg = MethodConfig(tau=0.7, ss_class_fraction=0)
    pseudo, conf = fuse_pseudo_labels([a, b], cfg, num_classes=3, click_map=click_map, valid=valid)
    assert pseudo.tolist() == [[[1, 255, 255, 255, 255]]]  # the clicked pixel gets no pseudo-label
    assert conf[0, 0, 0].item() == pytest.approx((0.9 + 0.8) / 2, abs=1 / 255)
    assert conf[0, 0, 2].item() == pytest.approx(0.45, abs=1 / 255)  # a split vote halves the confidence


def test_class_threshold_keeps_each_class_most_confident_fraction():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 40, 50))
    confs = rng.uniform(0.05, 0.6, (2, 40, 50))  # nothing reaches tau
    labels[0, :, :10] = 1  # classes of very different sizes
    click_map = torch.full((2, 40, 50), 255)
    click_map[0, 5, 5] = 2
    valid = torch.ones((2, 40, 50), dtype=torch.bool)
    valid[1, 30:] = False
    region = (click_map == 255) & valid
    fraction = 0.3

    def peer():
        return CompactPrediction(labels.astype(np.uint8), (confs * 255).round().astype(np.uint8))

    pseudo, _ = fuse_pseudo_labels([peer()], MethodConfig(tau=0.99, ss_class_fraction=fraction),
                                   3, click_map, valid)
    assert not (pseudo[~region] != 255).any()
    for c in range(3):
        predicted = (torch.from_numpy(labels) == c) & region
        kept = (pseudo == c).sum() / predicted.sum()
        assert kept.item() == pytest.approx(fraction, abs=0.01), c
        # the kept ones are the most confident of their class
        conf = torch.from_numpy(np.round(confs * 255) / 255)
        assert conf[pseudo == c].min() >= conf[predicted & (pseudo != c)].max()
    # a confident pixel is kept whatever its class's quantile
    confs[1, 0, 0] = 1.0
    pseudo, _ = fuse_pseudo_labels([peer()], MethodConfig(tau=0.9, ss_class_fraction=0.01),
                                   3, click_map, valid)
    assert pseudo[1, 0, 0] == labels[1, 0, 0]


def test_loss_ss_ignores_clicks_and_is_small_when_coverage_is_small():
    batch = _batch(h=20, w=20)
    logits = torch.randn(1, 3, 20, 20, requires_grad=True)
    cfg = MethodConfig(w_ts=0, w_ss=1, ss_start=0, rampup_steps=0)
    full = torch.randint(0, 3, (1, 20, 20))
    full[batch["click_map"] != 255] = 255  # fusion never labels clicked pixels
    sparse = torch.full_like(full, 255)
    sparse[0, :2, :] = full[0, :2, :]  # 39 of 398 unclicked pixels (row 1 holds a click): ~10% coverage
    loss_full = student_losses(cfg, 10, logits, batch, None, full)["loss_ss"]
    loss_sparse = student_losses(cfg, 10, logits, batch, None, sparse)["loss_ss"]
    ce = torch.nn.functional.cross_entropy(logits, full, ignore_index=255, reduction="none")
    assert loss_sparse.item() == pytest.approx(ce[0, :2].sum().item() / 398, rel=1e-5)
    assert loss_sparse.item() < 0.2 * loss_full.item()
    loss_sparse.backward()
    touched = logits.grad.abs().sum(1)[0] > 0
    assert touched.sum() == 39 and not touched[1, 1] and not touched[4, 3]  # clicks: loss_sup only


def test_loss_ss_per_image_class_weighs_small_classes_like_big_ones_times_coverage():
    batch = {"click_map": torch.full((1, 10, 10), 255), "valid": torch.ones(1, 10, 10, dtype=torch.bool)}
    logits = torch.randn(1, 3, 10, 10)
    pseudo = torch.full((1, 10, 10), 255)
    pseudo[0, :5] = 0  # a big confident region (50 px)...
    pseudo[0, 9, 9] = 2  # ...and one pixel of a small class: 51% coverage
    ce = torch.nn.functional.cross_entropy(logits, pseudo, ignore_index=255, reduction="none")[0]
    cfg = MethodConfig(w_ts=0, w_ss=1, ss_start=0, rampup_steps=0, ss_norm="image_class")
    loss = student_losses(cfg, 10, logits, batch, None, pseudo)["loss_ss"]
    assert loss.item() == pytest.approx(((ce[:5].mean() + ce[9, 9]) / 2 * 0.51).item(), rel=1e-5)


def test_loss_sup_weighs_each_image_class_the_same():
    # class 1: one clicked pixel; class 2: 9 pixels (a broken-up object's many disks)
    click_map = torch.full((1, 8, 8), 255)
    click_map[0, 0, 0] = 1
    click_map[0, 4:7, 4:7] = 2
    batch = {"click_map": click_map, "valid": torch.ones(1, 8, 8, dtype=torch.bool)}
    logits = torch.randn(1, 3, 8, 8)
    ce = torch.nn.functional.cross_entropy(logits, click_map, ignore_index=255, reduction="none")[0]
    per_class = (ce[0, 0] + ce[4:7, 4:7].mean()) / 2
    per_pixel = (ce[0, 0] + ce[4:7, 4:7].sum()) / 10
    losses = student_losses(MethodConfig(w_ts=0, w_ss=0), 0, logits, batch, None, None)
    assert losses["loss_sup"].item() == pytest.approx(per_class.item(), rel=1e-5)
    losses = student_losses(MethodConfig(w_ts=0, w_ss=0, sup_norm="pixel"), 0, logits, batch, None, None)
    assert losses["loss_sup"].item() == pytest.approx(per_pixel.item(), rel=1e-5)
    # full supervision: the same rule over the masks' pixels
    batch["mask"] = click_map
    dense = MethodConfig(supervision="dense", w_ts=0, w_ss=0)
    assert student_losses(dense, 0, logits, batch, None, None)["loss_sup"].item() == pytest.approx(per_class.item(),
                                                                                                   rel=1e-5)


def test_compact_prediction_is_two_bytes_per_pixel():
    probs = torch.tensor([[[[0.2]], [[0.7]], [[0.1]]]])
    pred = CompactPrediction.from_probs(probs)
    assert pred.label.dtype == np.uint8 and pred.label.item() == 1
    assert pred.confidence.item() == round(0.7 * 255)
    assert pred.nbytes == 2


def test_in_process_exchange_drops_entries_once_every_peer_read():
    ex = InProcessExchange(3)
    for k in range(3):
        ex.publish(0, k, _pred([[k]], [[1.0]]))
    assert [p.label.item() for p in ex.collect(0, 1)] == [0, 2]
    assert [p.label.item() for p in ex.collect(0, 0)] == [1, 2]
    assert len(ex) == 2  # student 2 was read by both its peers: dropped; 0 and 1 await reader 2
    ex.collect(0, 2)
    assert len(ex) == 0
    with pytest.raises(RuntimeError, match="student"):
        ex.collect(1, 0)


def test_miou_matches_a_hand_computed_confusion_matrix():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    # IoU_c = TP / (TP + FP + FN): 2/(2+1+1), 1/(1+1+1), 2/(2+1+1)
    assert cm.iou().tolist() == pytest.approx([0.5, 1 / 3, 0.5])
    assert cm.miou() == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 8)


def test_miou_leaves_out_classes_absent_everywhere():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert cm.miou() == 1.0


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match=r"method\.ema_decay"):
        load_spec(None, ["method.ema_decay=1.7"])
    with pytest.raises(SpecError, match=r"optim\.bogus: unknown field"):
        load_spec(None, ["optim.bogus=1"])
    with pytest.raises(SpecError, match=r"data\.crop_size"):
        load_spec(None, ["data.crop_size=[8, 8]"])
    with pytest.raises(SpecError, match="at least 2 students"):
        load_spec(None, ["students=[{model: deeplabv3plus_resnet18}]"])


def test_spec_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  tau: high\n")
    with pytest.raises(SpecError, match=r"bad\.yaml.*\n.*method\.tau"):
        load_spec(bad)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")


def test_pairwise_term_ties_similar_neighbours_and_stops_at_colour_edges():
    # left half dark, right half bright; logits that split exactly at the colour edge
    rgb = torch.zeros(1, 3, 8, 8)
    rgb[..., 4:] = 1.0
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    split = torch.zeros(1, 2, 8, 8)
    split[:, 0, :, :4] = split[:, 1, :, 4:] = 10.0
    along_edge = split.clone().requires_grad_(True)
    assert pairwise_affinity_loss(along_edge, rgb, valid, color_tol=0.05).item() < 1e-3
    across = torch.zeros(1, 2, 8, 8)
    across[:, 0, :4] = across[:, 1, 4:] = 10.0  # a split across rows, inside each colour region
    assert pairwise_affinity_loss(across, rgb, valid, color_tol=0.05).item() > 1.0
    # padding (invalid) pixels take no part
    no_pairs = pairwise_affinity_loss(across, rgb, torch.zeros_like(valid), color_tol=0.05)
    assert no_pairs.item() == 0.0


def test_cutmix_mixes_the_input_and_every_target_with_the_same_box():
    from seminar.method import CutMix, cutmix_boxes

    box = torch.zeros(3, 4, 5, dtype=torch.bool)
    box[0, 1:3, 2:4] = True
    mix = CutMix(box, partner=torch.tensor([1, 2, 0]))
    image = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 4, 5)  # image i is all i
    probs = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 5)
    label = torch.tensor([10, 11, 12]).view(3, 1, 1).expand(3, 4, 5)
    mixed_image, mixed_probs, mixed_label = mix(image), mix(probs), mix(label)
    assert (mixed_image[0][:, box[0]] == 1).all() and (mixed_image[0][:, ~box[0]] == 0).all()
    assert (mixed_probs[0][:, box[0]] == 1).all() and (mixed_probs[0][:, ~box[0]] == 0).all()
    assert (mixed_label[0][box[0]] == 11).all() and (mixed_label[0][~box[0]] == 10).all()
    assert torch.equal(mixed_label[1:], label[1:]) and mix(None) is None  # no box: unchanged

    rng = np.random.default_rng(0)
    assert not cutmix_boxes(rng, 4, 32, 48, prob=0).any()
    boxes = cutmix_boxes(rng, 200, 32, 48, prob=1)
    areas = boxes.reshape(200, -1).mean(1)
    assert (areas > 0).all() and 0.01 < areas.min() and areas.max() <= 0.45  # 2-40% of the image, rounded
    for b in boxes[:20]:  # one rectangle each
        rows, cols = np.flatnonzero(b.any(1)), np.flatnonzero(b.any(0))
        assert b[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and b.sum() == len(rows) * len(cols)
    half = cutmix_boxes(np.random.default_rng(1), 400, 16, 16, prob=0.5).reshape(400, -1).any(1).mean()
    assert 0.4 < half < 0.6
