"""Label-free reconstruction and distilled fine-tuning (compress/reconstruct.py, finetune(teacher=))."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from _archs import trained_digits_usernet
from si_compress.compress import apply_plan, evaluate, finetune, kd_loss, reconstruct, refit_consumers


def test_kd_loss_known_values():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert float(kd_loss(s, s, 4.0)) == pytest.approx(0.0, abs=1e-7)
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    p, q = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    want = 4.0 * float((p * (p.log() - q.log())).sum(1).mean())
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def digits_case():
    from si_compress.pipeline import CompressConfig, si_plan

    m, train, test = trained_digits_usernet()
    calib = DataLoader(torch.utils.data.Subset(train.dataset, range(400)), batch_size=100)
    x0 = next(iter(calib))[0][:1]
    cfg = CompressConfig(target_macs=0.3, objective="macs", round_to=4, order=1, compensation="refit")
    plan, _ = si_plan(m, calib, arch="user", num_classes=10, example_input=x0, config=cfg)
    small = apply_plan(m, plan, example_input=x0)
    refit_consumers(small, m, plan, calib)
    xs = torch.cat([x for x, _ in DataLoader(train.dataset, batch_size=256)])
    return m, small, xs, DataLoader(test.dataset, batch_size=256)


def _agreement(a, b, loader):
    with torch.no_grad():
        return sum(float(kd_loss(a(x), b(x), 1.0)) * len(x) for x, _ in loader) / len(loader.dataset)


def test_reconstruction_uses_no_labels_and_brings_the_model_back_to_the_base(digits_case):
    base, small, xs, test = digits_case
    student = copy.deepcopy(small)
    before_state = {k: v.clone() for k, v in base.state_dict().items()}
    unlabelled = DataLoader(TensorDataset(xs), batch_size=64)          # images only: no labels to use
    acc_before, gap_before = evaluate(student, test), _agreement(student, base, test)
    seen = []
    rep = reconstruct(student, base, unlabelled, steps=120, seconds=3600, images=1000, lr=1e-3,
                      progress=seen.append)
    acc_after, gap_after = evaluate(student, test), _agreement(student, base, test)
    assert rep["labels_used"] is False and rep["images"] == 1000 and rep["steps"] == 120
    assert rep["loss_last10"] < rep["loss_first"]
    assert gap_after < 0.7 * gap_before, (gap_before, gap_after)     # closer to the base's outputs
    assert acc_after >= acc_before, (acc_before, acc_after)
    assert [r["step"] for r in seen] == [50, 100, 120]
    assert all(torch.equal(v, before_state[k]) for k, v in base.state_dict().items())   # teacher untouched
    assert not student.training and not base.training


def test_feature_targets_match_section_outputs(digits_case):
    base, small, xs, _ = digits_case
    student = copy.deepcopy(small)
    rep = reconstruct(student, base, [xs[:200]], steps=5, seconds=60, targets="both")
    assert rep["layers"] and all(n in dict(base.named_modules()) for n in rep["layers"])
    with pytest.raises(ValueError, match="targets"):
        reconstruct(student, base, [xs[:10]], targets="labels")
    with pytest.raises(ValueError, match="steps"):
        reconstruct(student, base, [xs[:10]], steps=0)


def test_budget_in_seconds_stops_early(digits_case):
    base, small, xs, _ = digits_case
    rep = reconstruct(copy.deepcopy(small), base, [xs[:64]], steps=10_000, seconds=0.5)
    assert 1 <= rep["steps"] < 10_000 and rep["seconds"] < 30   # the first step alone may take seconds on a busy machine


def test_distillation_with_an_identical_teacher_leaves_the_weights_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    teacher = copy.deepcopy(model)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    w0 = [p.detach().clone() for p in model.parameters()]
    # all weight on the teacher's logits, which equal the student's: zero gradient, no decay
    finetune(model, loader, epochs=1, lr=0.1, weight_decay=0.0, teacher=teacher, kd_weight=1.0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(w0, model.parameters()))   # roundoff only
    # with labels in the loss the weights move
    hist = finetune(model, loader, epochs=1, lr=0.1, weight_decay=0.0, teacher=teacher, kd_weight=0.5)
    assert hist[0]["teacher"] and max(float((a - b.detach()).abs().max()) for a, b in zip(w0, model.parameters())) > 1e-3
    with pytest.raises(ValueError, match="kd_weight"):
        finetune(model, loader, epochs=1, teacher=teacher, kd_weight=1.5)


def test_a_loader_in_class_order_still_gives_mixed_batches():
    """A dataset in class order (ImageFolder) read without shuffling would give one-class batches, which
    train-mode BatchNorm and Adam both handle badly: reconstruction re-shuffles its cached images every pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    teacher = copy.deepcopy(model)
    # 4 'classes' x 8 images, each image constant = its class id, in class order
    xs = torch.arange(4.0).repeat_interleave(8)[:, None, None].expand(32, 1, 4).reshape(32, 1, 2, 2).clone()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    rep = reconstruct(model, teacher, DataLoader(TensorDataset(xs), batch_size=8), steps=8, seconds=60, bn="train",
                      bf16=False)
    assert rep["steps"] == 8 and rep["batch"] == 8 and len(seen) >= 8   # then BatchNorm's re-estimation passes
    seen = seen[:8]
    assert all(len(b) == 8 for b in seen)
    assert sum(len(torch.unique(b.flatten(1)[:, 0])) > 1 for b in seen) >= 6    # mixed, not one class per batch
    first_pass = torch.cat(seen[:4]).flatten(1)[:, 0]
    assert torch.equal(torch.sort(first_pass).values, torch.sort(xs.flatten(1)[:, 0]).values)   # each image once
    assert not torch.equal(torch.cat(seen[:4]), torch.cat(seen[4:]))                         # a new order per pass


def test_image_budget_known_values():
    from si_compress.compress.reconstruct import image_budget

    assert image_budget(50_000, (3, 32, 32)) == 50_000                  # 586 MiB: the whole CIFAR train split
    assert image_budget(1_281_167, (3, 224, 224)) == (2 << 30) // (3 * 224 * 224 * 4) == 3566
    assert image_budget(1_797, (1, 8, 8)) == 1_797                       # fewer available than the cap
    assert image_budget(80_000, (3, 32, 32), cap=60_000) == 60_000
    assert image_budget(100, (3, 32, 32), cache_bytes=10 * 12288) == 10
    assert image_budget(100, (3, 4096, 4096), cache_bytes=1) == 1         # at least one
    with pytest.raises(ValueError, match="no images"):
        image_budget(0, (3, 32, 32))


class _Plain(torch.utils.data.Dataset):
    """Not a TensorDataset: reconstruct reads it through the loader, batch by batch."""

    def __init__(self, xs):
        self.xs = xs

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return (self.xs[i],)


def test_a_preloaded_dataset_is_used_in_place_and_trains_exactly_like_the_loader_path(monkeypatch):
    """A TensorDataset read in order is reconstruction's cache as it is (its own storage, no second copy of the
    images); it must train exactly as reading the same images batch by batch does."""
    import importlib

    R = importlib.import_module("si_compress.compress.reconstruct")   # the module (the package exports the function)
    cached, shuffled = [], R._Shuffled
    monkeypatch.setattr(R, "_Shuffled", lambda x, *a, **k: (cached.append(x), shuffled(x, *a, **k))[1])
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    xs = torch.randn(70, 3, 2, 2)
    runs = []
    for ds in (TensorDataset(xs), _Plain(xs)):
        torch.manual_seed(1)
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
        rep = reconstruct(student, teacher, DataLoader(ds, batch_size=16), steps=9, seconds=60, images=50,
                          bf16=False)
        runs.append((rep, [p.detach().clone() for p in student.parameters()]))
    (ra, wa), (rb, wb) = runs
    assert ra["images"] == rb["images"] == 50 and ra["batch"] == rb["batch"] == 16
    assert ra["loss_first"] == rb["loss_first"] and ra["loss_last"] == rb["loss_last"]
    assert all(torch.equal(a, b) for a, b in zip(wa, wb))
    assert cached[0].untyped_storage().data_ptr() == xs.untyped_storage().data_ptr()      # shared, not copied
    assert cached[1].untyped_storage().data_ptr() != xs.untyped_storage().data_ptr()
    assert torch.equal(cached[0], cached[1])


def test_the_cache_takes_every_image_by_default_and_honours_the_loader():
    from si_compress.compress.reconstruct import _cache

    xs = torch.randn(70, 3, 2, 2)
    for ds in (TensorDataset(xs), _Plain(xs)):
        x, b = _cache(DataLoader(ds, batch_size=16), None)            # default budget: all 70 (tiny)
        assert torch.equal(x, xs) and b == 16
        x, b = _cache(DataLoader(ds, batch_size=16), 500)             # more than there are
        assert torch.equal(x, xs)
        x, b = _cache(DataLoader(ds, batch_size=16, drop_last=True), None)   # the loader's last batch dropped
        assert torch.equal(x, xs[:64])
    x, _ = _cache(DataLoader(TensorDataset(xs), batch_size=16, collate_fn=lambda items: (2 * torch.stack(
        [i[0] for i in items]),)), None)                                 # its collate_fn applies
    assert torch.equal(x, 2 * xs)


def _conv_net(seed):
    # no conv bias before BatchNorm: its gradient is zero up to rounding, which Adam would scale up to lr-sized
    # steps in different directions for the two layouts
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("stage", ["reconstruct", "finetune"])
def test_channels_last_trains_like_the_plain_layout_and_gives_each_tensor_its_layout_back(stage):
    """The channels-last path (the CPU default) is a layout change only: the same steps from the same start give
    the same weights as the plain layout, up to float rounding; student and teacher come back with the
    strides they had (a deliberately transposed weight included), and the teacher's values are unchanged."""
    from si_compress.compress.finetune import cifar_augment

    teacher = _conv_net(0).eval()
    w = teacher[3].weight
    w.data = w.data.transpose(2, 3).contiguous().transpose(2, 3)       # odd strides, to come back as they were
    t_strides = {k: v.stride() for k, v in teacher.state_dict().items()}
    t_values = {k: v.clone() for k, v in teacher.state_dict().items()}
    xs, ys = torch.randn(96, 3, 8, 8), torch.randint(0, 4, (96,))
    runs = {}
    for cl in (False, True):
        student = _conv_net(1)
        strides = {k: v.stride() for k, v in student.state_dict().items()}
        torch.manual_seed(2)
        if stage == "reconstruct":
            rep = reconstruct(student, teacher, DataLoader(TensorDataset(xs), batch_size=32), steps=6, seconds=60,
                              lr=1e-2, bf16=False, channels_last=cl, augment=cifar_augment)
            assert rep["channels_last"] is cl
        else:
            hist = finetune(student, DataLoader(TensorDataset(xs, ys), batch_size=32), epochs=2, lr=0.05,
                            teacher=teacher, channels_last=cl, augment=cifar_augment)
            assert hist[-1]["channels_last"] is cl
        assert {k: v.stride() for k, v in student.state_dict().items()} == strides
        assert {k: v.stride() for k, v in teacher.state_dict().items()} == t_strides
        assert all(torch.equal(v, t_values[k]) for k, v in teacher.state_dict().items())
        runs[cl] = {k: v.clone() for k, v in student.state_dict().items()}
    moved = max(float((runs[False][k] - v).abs().max()) for k, v in _conv_net(1).state_dict().items()
                if v.is_floating_point())
    assert moved > 1e-2                                                   # training did change the weights
    for k, v in runs[False].items():
        assert torch.allclose(v.float(), runs[True][k].float(), rtol=1e-3, atol=1e-4), k
