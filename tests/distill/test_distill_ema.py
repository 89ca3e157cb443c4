"""EMA teacher against the closed form θ_t ← m_k θ_t + (1 − m_k) θ_s, m_k = m (1 − exp(−k / τ))."""

from __future__ import annotations

import io
import math

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, one_thread, tiny_config, tiny_model, tiny_setup
from torch import nn

from oddetr.distill.ema import EmaTeacher, ema_decay_at


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_ema_decay_at_values():
    # m (1 - e^{-k/τ}) written out with literal constants
    assert ema_decay_at(0, 0.99, 100.0) == 0.0
    assert ema_decay_at(100, 0.99, 100.0) == pytest.approx(0.99 * 0.6321205588285577, abs=1e-15)
    assert ema_decay_at(50, 0.9997, 2000.0) == pytest.approx(0.9997 * 0.024690087971667385, abs=1e-15)
    assert ema_decay_at(10**6, 0.9997, 2000.0) == pytest.approx(0.9997, abs=1e-15)
    # increasing in k, bounded by m
    values = [ema_decay_at(k, 0.9, 3.0) for k in range(50)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v < 0.9 for v in values)
    # τ <= 0: no warm-up, the plain decay
    assert ema_decay_at(0, 0.9, 0.0) == 0.9
    assert ema_decay_at(7, 0.9, -1.0) == 0.9


def test_ema_update_matches_recursive_closed_form_in_float64():
    student = _small_net()
    decay, tau, steps = 0.9, 3.0, 6
    ema = EmaTeacher(student, decay, tau)
    names = [n for n, _ in student.named_parameters()]
    theta0 = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in student.named_parameters()}

    expected = {n: theta0[n].clone() for n in names}  # teacher starts as a copy
    for k in range(1, steps + 1):
        # the student moves in a known way: θ_s(k) = θ_s(0) + k δ
        with torch.no_grad():
            for n, p in student.named_parameters():
                p.copy_((theta0[n] + k * delta[n]).float())
        m_k = decay * (1.0 - math.exp(-k / tau))
        for n in names:
            student_value = (theta0[n] + k * delta[n]).float().double()
            expected[n] = m_k * expected[n] + (1.0 - m_k) * student_value
        used = ema.update(student)
        assert used == pytest.approx(m_k, abs=1e-15)
        assert ema.step == k
    for n, p in ema.model.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-6, atol=1e-6)
        # and it is not simply the student (the EMA lags behind)
        assert not torch.allclose(p.double(), (theta0[n] + steps * delta[n]).float().double(), atol=1e-3)


def test_ema_averages_float_buffers_and_copies_integer_ones():
    """BN running statistics follow the weights' EMA (closed form); num_batches_tracked is copied."""
    student = _small_net()
    ema = EmaTeacher(student, 0.9, 0.0)  # m_k = 0.9 for every k
    bn_student = student[1]
    expected_mean = bn_student.running_mean.detach().double().clone()
    expected_var = bn_student.running_var.detach().double().clone()
    for k in range(1, 4):
        with torch.no_grad():
            bn_student.running_mean.copy_(torch.arange(4.0) * k + 10.0)
            bn_student.running_var.copy_(torch.full((4,), 3.0 * k))
            bn_student.num_batches_tracked.fill_(17 * k)
        ema.update(student)
        expected_mean = 0.9 * expected_mean + 0.1 * (torch.arange(4.0, dtype=torch.float64) * k + 10.0)
        expected_var = 0.9 * expected_var + 0.1 * torch.full((4,), 3.0 * k, dtype=torch.float64)
        bn_teacher = ema.model[1]
        torch.testing.assert_close(bn_teacher.running_mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn_teacher.running_var.double(), expected_var, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(bn_teacher.running_mean, bn_student.running_mean)  # averaged, not copied
        assert bn_teacher.running_mean.data_ptr() != bn_student.running_mean.data_ptr()
        assert int(bn_teacher.num_batches_tracked) == 17 * k  # integer buffers: copied


def test_teacher_of_a_frozen_student_converges_to_it_buffers_included():
    """A student that stops changing is reached by its teacher, BatchNorm statistics included."""
    student = _small_net()
    with torch.no_grad():
        student[1].running_mean.fill_(2.0)
        student[1].running_var.fill_(5.0)
    ema = EmaTeacher(student, 0.5, 0.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(-1.0)
    for _ in range(60):  # 0.5 ** 60 ~ 1e-18
        ema.update(student)
    for (name, t), (_, s) in zip(ema.model.state_dict().items(), student.state_dict().items()):
        torch.testing.assert_close(t.double(), s.double(), rtol=0, atol=1e-6, msg=name)


def test_ema_teacher_frozen_eval_and_independent_of_student():
    student = _small_net()
    student.train()
    ema = EmaTeacher(student, 0.9, 1.0)
    for _ in range(2):
        assert all(not p.requires_grad for p in ema.model.parameters())
        assert all(not m.training for m in ema.model.modules())
        ema.update(student)
    assert student.training and all(p.requires_grad for p in student.parameters())
    # a deep copy: editing the student in place leaves the teacher alone
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, ema.model.parameters()))


def test_ema_shared_head_is_averaged_exactly_once():
    cfg = tiny_config("model.box_refine=false")
    student = tiny_model(cfg)
    # without box refinement the class / box heads are one module repeated per decoder layer
    assert cfg.model.dec_layers == 2
    assert student.class_heads[0] is student.class_heads[1]
    assert student.bbox_heads[0] is student.bbox_heads[1]
    decay, tau = 0.9, 1.0
    ema = EmaTeacher(student, decay, tau)
    assert ema.model.class_heads[0] is ema.model.class_heads[1]  # the copy keeps the sharing

    theta0 = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    g = torch.Generator().manual_seed(3)
    delta = {}
    with torch.no_grad():
        for n, p in student.named_parameters():
            delta[n] = torch.randn(p.shape, generator=g)
            p.add_(delta[n])
    ema.update(student)
    m1 = decay * (1.0 - math.exp(-1.0 / tau))
    shared = "class_heads.0.weight"
    assert shared in theta0
    for n, p in ema.model.named_parameters():
        target = (theta0[n].float() + delta[n]).double()
        expected = m1 * theta0[n] + (1 - m1) * target
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-6)
    # a naive per-layer update would have applied the shared head's update dec_layers times
    t_shared = ema.model.class_heads[1].weight.double()
    naive = m1**2 * theta0[shared] + (1 - m1**2) * (theta0[shared].float() + delta[shared]).double()
    assert (t_shared - naive).abs().max() > 1e-2


def test_ema_state_dict_round_trip_restores_step_and_weights():
    student = _small_net()
    ema = EmaTeacher(student, 0.9, 2.0)
    with torch.no_grad():
        for k in range(3):
            for p in student.parameters():
                p.add_(0.1 * (k + 1))
            ema.update(student)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    other_student = _small_net()
    with torch.no_grad():
        for p in other_student.parameters():
            p.mul_(-3.0)
    restored = EmaTeacher(other_student, 0.9, 2.0)
    assert restored.step == 0
    restored.load_state_dict(state)
    assert restored.step == 3
    for (n, a), (_, b) in zip(ema.model.state_dict().items(), restored.model.state_dict().items()):
        assert torch.equal(a, b), n
    # the next update uses m_4 in both, so they stay identical
    assert restored.update(student) == ema.update(student) == pytest.approx(0.9 * (1 - math.exp(-4 / 2.0)))
    for a, b in zip(ema.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)


def test_batch_statistics_normalises_like_training_mode_and_leaves_the_teacher_untouched():
    from oddetr.distill.ema import batch_statistics

    net = _small_net()
    with torch.no_grad():  # a few training batches so that running statistics differ from any one batch's
        for seed in range(3):
            net(torch.randn(16, 3, generator=torch.Generator().manual_seed(seed)) * 2 + 1)
    net.eval()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(9))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    oracle = copy_in_train_mode(net)(x)  # a training-mode copy: batch statistics (its own buffers move)
    with torch.no_grad(), batch_statistics(net):
        inside = net(x)
    assert torch.allclose(inside, oracle, atol=1e-6)
    assert not torch.allclose(inside, net(x), atol=1e-3)  # the eval-mode output differs
    for k, v in net.state_dict().items():  # running mean / var and num_batches_tracked untouched
        assert torch.equal(v, reference[k]), k
    assert not net.training and not net[1].training and net[1].track_running_stats


def copy_in_train_mode(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).train()


def test_distiller_teacher_bn_batch_gives_the_training_mode_teacher_output():
    _, student, _, distiller = tiny_setup("distill.teacher_bn=batch", "distill.aux=false")
    _, _, _, running = tiny_setup("distill.aux=false")
    images, masks = images_and_masks()
    targets = fixed_targets()
    oracle = copy_in_train_mode(distiller.teacher.model)
    with torch.no_grad():
        expected = oracle(images, masks).main.logits
    got = distiller.prepare(images, masks, targets).teacher.main.logits
    assert torch.allclose(got, expected, atol=1e-5)
    # at init the boxes are the reference points either way; the class logits see the normalisation
    assert not torch.allclose(running.prepare(images, masks, targets).teacher.main.logits, expected, atol=1e-3)
    assert not distiller.teacher.model.training


def test_ema_schedule_follows_the_horizon_rule_unless_given():
    from oddetr.distill.ema import ema_schedule

    # 4% of 900 steps = 36: 1 / (1 - m) = 36, tau = 36
    m, tau = ema_schedule(None, None, 0.04, 900)
    assert tau == pytest.approx(36.0) and 1 / (1 - m) == pytest.approx(36.0)
    # COCO, 12 epochs at batch 16: 87,960 steps -> 3518.4
    m, tau = ema_schedule(None, None, 0.04, 87_960)
    assert tau == pytest.approx(3518.4) and m == pytest.approx(1 - 1 / 3518.4)
    assert ema_schedule(0.97, 33.0, 0.04, 900) == (0.97, 33.0)  # explicit values win
    assert ema_schedule(0.97, None, 0.04, 900) == (0.97, pytest.approx(36.0))
    assert ema_schedule(None, None, 0.04, 50) == (pytest.approx(0.9), 10.0)  # at least 10 steps
    with pytest.raises(ValueError, match="total optimiser steps"):
        ema_schedule(None, None, 0.04, None)
