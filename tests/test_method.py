"""The method's pieces: EMA teacher, losses, pseudo-label fusion, mIoU."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from seminar.config import MethodConfig, SpecError, load_spec
from seminar.exchange import CompactPrediction, InProcessExchange
from seminar.method import EmaTeacher, fuse_pseudo_labels, sigmoid_rampup, student_losses
from seminar.metrics import ConfusionMatrix


def test_ema_teacher_tracks_parameters_and_batchnorm_buffers():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = EmaTeacher(student)
    student.train()
    student(torch.randn(8, 3, 8, 8) * 3 + 1)  # moves BatchNorm's running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    step, ema_decay = 50, 0.9
    teacher.update(student, step, ema_decay, 1.0)
    d = EmaTeacher.decay_at(step, ema_decay, 1.0)
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


def test_ema_warmup_follows_the_student_early():
    for power in (1.0, 2 / 3):
        assert EmaTeacher.decay_at(0, 0.99, power) == 0.0  # first update copies the student
        assert EmaTeacher.decay_at(10_000, 0.99, power) == 0.99
    assert EmaTeacher.decay_at(9, 0.99, 1.0) == pytest.approx(0.9)  # mean teacher: 1 - 1/(t+1)
    assert EmaTeacher.decay_at(7, 0.99, 2 / 3) == pytest.approx(0.75)  # timm: 1 - 8^(-2/3)
    # The default forgets the first steps sooner: at step 99 a mean teacher still gives
    # steps 0-9 a tenth of its weight.
    assert load_spec(None, []).method.ema_warmup_power == pytest.approx(2 / 3)
    assert EmaTeacher.decay_at(99, 0.99, 2 / 3) < EmaTeacher.decay_at(99, 0.99, 1.0)


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


def test_fusion_votes_thresholds_and_overwrites_clicks():
    # pixels: agree-confident, agree-unsure, disagree, clicked, outside the image
    a = _pred([[1, 1, 1, 2, 1]], [[0.9, 0.5, 0.9, 0.9, 0.9]])
    b = _pred([[1, 1, 2, 2, 1]], [[0.8, 0.5, 0.9, 0.9, 0.9]])
    click_map = torch.tensor([[[255, 255, 255, 0, 255]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    pseudo, conf = fuse_pseudo_labels([a, b], num_classes=3, tau=0.7, click_map=click_map, valid=valid)
    assert pseudo.tolist() == [[[1, 255, 255, 0, 255]]]
    assert conf[0, 0, 0].item() == pytest.approx((0.9 + 0.8) / 2, abs=1 / 255)
    assert conf[0, 0, 2].item() == pytest.approx(0.45, abs=1 / 255)  # a split vote halves the confidence


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
