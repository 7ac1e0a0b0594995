"""Label-free reconstruction: train the compressed model to reproduce the base model, no labels.

After the least-squares re-fit (``compensate.refit_consumers``), the pruned network still differs
from the base wherever the re-fit's one-layer view could not follow. ``reconstruct`` runs a short,
budgeted optimisation of every parameter of the pruned model (the student) against the base model
(the teacher) on unlabelled images:

    logits:   L = T^2 * KL( softmax(t / T) || softmax(s / T) )                     (T = temperature)
    features: L = mean over matched layers of ||s_l - t_l||^2 / ||t_l||^2 (layers whose output
              shapes agree in both models: section outputs, stage outputs)
    both:     the sum of the two.

Adam (peak learning rate 1e-3) with a cosine decay, on the images of ``loader`` (its labels, if any, are
ignored) re-shuffled every pass, optional augmentation applied identically to teacher and student inputs,
bf16 autocast where the CPU (or a GPU) supports it; it stops at ``steps`` or after ``seconds``, whichever
comes first. BatchNorm normalises by batch statistics while training and its running statistics are
re-estimated afterwards (``bn="train"``, the default); ``bn="frozen"`` keeps it in eval mode (the
statistics the least-squares re-fit set stay, its affine parameters train). Measured on ResNet-56 at -50%
MACs (README): batch statistics at lr 1e-3 took the re-fit from 84.75% to 87.76% in 1,200 steps on 10,000
images; logits are
the default because they beat "both" in a 300-step probe from one re-fit.
The report says exactly what was used (images, steps, seconds, losses).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import SequentialSampler, TensorDataset, default_collate

from .. import _device

__all__ = ["reconstruct", "kd_loss", "image_budget", "TARGETS", "MAX_IMAGES", "CACHE_BYTES"]

TARGETS = ("logits", "features", "both")
MAX_IMAGES = 50_000        # default image count: CIFAR's whole train split
CACHE_BYTES = 2 << 30      # default bound on the cached images (float32), 2 GiB


def image_budget(available: int, image_shape, *, itemsize: int = 4, cap: int = MAX_IMAGES,
                 cache_bytes: int = CACHE_BYTES) -> int:
    """Default image count for reconstruction: every one of ``available`` images up to ``cap``, fewer when
    their cache (prod(image_shape) * itemsize bytes each) would exceed ``cache_bytes``; at least 1.

    CIFAR (3, 32, 32) float32, 12 KiB each: 50,000 images, 586 MiB. (3, 224, 224), 588 KiB each: 3,566
    images, 2 GiB. More images beat more passes over fewer images (README, "Label-free reconstruction").
    """
    if available < 1:
        raise ValueError(f"no images to reconstruct on (available={available})")
    per = int(itemsize)
    for d in image_shape:
        per *= int(d)
    return max(1, min(int(available), int(cap), int(cache_bytes) // max(per, 1)))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al.'s scaling)."""
    T = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / T, 1), F.log_softmax(teacher_logits.float() / T, 1),
                    reduction="batchmean", log_target=True) * (T * T)


def _inputs(item):
    return item[0] if isinstance(item, (tuple, list)) else item


class _Outputs:
    """Outputs of named modules during a forward (kept with their autograd graph)."""

    def __init__(self, model: nn.Module, names):
        self.got: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: self.got.__setitem__(n, out)) for n in names]

    def close(self):
        for h in self.handles:
            h.remove()


def _matched_layers(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> list[str]:
    """Recorded layers (the adapter's) present in both models with equal output shapes."""
    from ..structure import describe

    names = [n for n in describe(teacher, x[:1]).layers if ":" not in n]
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    names = [n for n in names if n in s_mods and n in t_mods]
    if not names:
        return []
    so, to = _Outputs(student, names), _Outputs(teacher, names)
    try:
        with torch.no_grad():
            student.eval()(x[:1])
            teacher.eval()(x[:1])
    finally:
        so.close()
        to.close()
    return [n for n in names if n in so.got and n in to.got and isinstance(so.got[n], torch.Tensor)
            and so.got[n].shape == to.got[n].shape]


def reconstruct(student: nn.Module, teacher: nn.Module, loader, *, steps: int = 1200, seconds: float = 300.0,
                images: int | None = None, lr: float = 1e-3, temperature: float = 4.0, targets: str = "logits",
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None, bf16: bool = True,
                bn: str = "train", device: str | torch.device | None = None, seed: int = 0,
                channels_last: bool | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Train ``student`` in place to reproduce ``teacher`` on the inputs of ``loader`` (no labels used).

    ``steps``/``seconds``: the budget (whichever ends first); ``images``: use at most this many
    images of ``loader`` (its first ones, re-shuffled every pass; None: as many as :func:`image_budget`
    allows, at most 50,000 within a 2 GiB cache). A TensorDataset read in order by a plain loader is used
    in place, shared, not copied; ``targets``: "logits", "features" or "both" (see
    the module doc). The teacher is never changed. ``bn``: ``"train"`` normalises by batch statistics and
    re-estimates the running ones at the end; ``"frozen"`` trains with BatchNorm in eval mode (the running
    statistics the re-fit set stay; scales and shifts train). The learning
    rate follows a cosine over the budget used (the larger of the step and the time fraction), so
    it reaches zero whichever limit ends the run. Returns a report: ``targets, steps, seconds,
    images, loss_first, loss_last, layers`` (the matched feature layers), ``bn``. The student is
    left in eval mode. ``device``: where both models train and run (None: the student's own
    device); both come back to where they were. ``channels_last``: train (and run the teacher) in the
    channels-last layout (None: on the CPU, where it is faster; see ``_device.use_channels_last``); the
    parameters of both models come back in the layout they had. The cached images are re-shuffled (``seed``) on every
    pass, so a loader in dataset order still gives mixed batches of its batch size.
    """
    if bn not in ("frozen", "train"):
        raise ValueError(f"bn must be 'frozen' or 'train'; got {bn!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}; got {targets!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0; got {seconds!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    dev = _device.target(device, student)
    x_all, batch = _cache(loader, images)
    n = len(x_all)
    if n == 0:
        raise ValueError("reconstruct: the loader yielded no images")
    # the adapter traces the layers where the models are, before they move
    layers = _matched_layers(student, teacher, x_all[:1].to(_device.model_device(student))) \
        if targets != "logits" else []
    if targets == "features" and not layers:
        raise ValueError("reconstruct(targets='features'): no layer has the same output shape in both models; "
                         "use targets='logits'")
    with _device.on_device(dev, student, teacher):
        # A loader in dataset order (ImageFolder: class by class) would give one-class batches; batches are drawn
        # from a fresh permutation of the cached images on every pass instead (cached on the CPU, each batch
        # moved to the device as it is drawn).
        cl = _device.use_channels_last(channels_last, dev)
        batches = _Shuffled(x_all.cpu(), batch, seed, dev, channels_last=cl)
        with _device.channels_last(cl, student, teacher):
            report = _train(student, teacher, batches, n=n, layers=layers, dev=dev, steps=steps, seconds=seconds,
                            lr=lr, temperature=temperature, targets=targets, augment=augment, bf16=bf16, bn=bn,
                            channels_last=cl, progress=progress)
        return {**report, "channels_last": cl}


def _cache(loader, images: int | None) -> tuple[torch.Tensor, int]:
    """(the first ``images`` inputs of ``loader`` as one tensor, its batch size). ``images`` None: as many as
    :func:`image_budget` allows. A TensorDataset read in order, unchanged by the loader, is used in place (a
    view); otherwise the batches are copied into one tensor allocated once (no second copy at the peak)."""
    ds = getattr(loader, "dataset", None)
    if isinstance(ds, TensorDataset) and type(getattr(loader, "sampler", None)) is SequentialSampler \
            and getattr(loader, "batch_size", None) and not loader.drop_last and loader.collate_fn is default_collate:
        x = ds.tensors[0]
        cap = images if images is not None else image_budget(max(len(x), 1), x.shape[1:], itemsize=x.element_size())
        return x[:cap], int(loader.batch_size)
    out, n, batch, cap = None, 0, 0, images
    try:
        total = len(ds) if ds is not None else None
    except TypeError:        # an iterable dataset
        total = None
    for item in loader:
        x = _inputs(item)
        if cap is None:
            cap = image_budget(MAX_IMAGES, x.shape[1:], itemsize=x.element_size())
        x = x[: cap - n]
        if out is None:
            batch = len(x)
            size = cap if total is None else min(cap, total)
            out = x.new_empty((max(size, len(x)), *x.shape[1:]))
        if n + len(x) > len(out):      # the loader yields more than its dataset's length said
            out = torch.cat([out[:n], x.new_empty((max(n, len(x)), *x.shape[1:]))])
        out[n:n + len(x)] = x
        n += len(x)
        if n >= cap:
            break
    if out is None:
        return torch.empty(0), 1
    return out[:n], batch


class _Shuffled:
    """Batches of ``batch`` images of ``x`` (N, ...) on ``device``, a new seeded permutation per pass (the last
    partial batch of a pass is dropped unless it is the only one)."""

    def __init__(self, x: torch.Tensor, batch: int, seed: int, device, channels_last: bool = False):
        self.x, self.device, self.batch = x, device, max(1, min(int(batch), len(x)))
        self.channels_last = channels_last
        self.per_pass = max(1, len(x) // self.batch)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm, self.pass_no = None, -1

    def __getitem__(self, step: int) -> torch.Tensor:
        p, i = divmod(step, self.per_pass)
        if p != self.pass_no:
            self.perm, self.pass_no = torch.randperm(len(self.x), generator=self.gen), p
        return _device.to_device(_device.as_layout(self.x[self.perm[i * self.batch:(i + 1) * self.batch]],
                                                   self.channels_last), self.device)

    def passes(self):
        """Every image once, in order (for BatchNorm re-estimation)."""
        return [_device.to_device(_device.as_layout(self.x[i:i + self.batch], self.channels_last), self.device)
                for i in range(0, len(self.x), self.batch)]


def _train(student, teacher, batches, *, n, layers, dev, steps, seconds, lr, temperature, targets, augment, bf16,
           bn, channels_last, progress) -> dict:
    use_bf16 = bool(bf16) and (torch.cuda.is_bf16_supported() if dev.type == "cuda" else _cpu_bf16())
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    t_modes = [(m, m.training) for m in teacher.modules()]
    teacher.eval()
    so = _Outputs(student, layers) if layers else None
    to = _Outputs(teacher, layers) if layers else None
    losses, done, t0 = [], 0, time.perf_counter()
    try:
        student.train(bn == "train")
        while done < steps and time.perf_counter() - t0 < seconds:
            frac = max(done / steps, (time.perf_counter() - t0) / seconds)
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            x = batches[done]
            if augment is not None:
                x = _device.as_layout(augment(x), channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                with torch.no_grad():
                    t_logits = teacher(x)
                    t_feats = {k: v.detach() for k, v in to.got.items()} if to else {}
                s_logits = student(x)
                loss = s_logits.new_zeros((), dtype=torch.float32)
                if targets in ("logits", "both"):
                    loss = loss + kd_loss(s_logits, t_logits, temperature)
                if targets in ("features", "both"):
                    loss = loss + sum(((so.got[k].float() - t_feats[k].float()) ** 2).mean()
                                      / (t_feats[k].float() ** 2).mean().clamp_min(1e-12) for k in layers) / len(layers)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reconstruction loss became {float(loss)} at step {done + 1}; lower lr "
                                         f"(now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None and (done % 50 == 0 or done == steps):
                progress({"step": done, "steps": steps, "loss": losses[-1], "seconds": time.perf_counter() - t0})
    finally:
        if so:
            so.close()
        if to:
            to.close()
        for m, mode in t_modes:
            m.training = mode
    if bn == "train":
        from .compensate import recalibrate_bn

        recalibrate_bn(student, batches.passes())
    student.eval()
    return dict(targets=targets, bn=bn, steps=done, steps_budget=steps, seconds=time.perf_counter() - t0,
                seconds_budget=float(seconds), images=int(n), batch=int(batches.batch), lr=lr,
                temperature=temperature, bf16=use_bf16, loss_first=losses[0], loss_last=losses[-1],
                loss_last10=float(sum(losses[-10:]) / len(losses[-10:])), layers=layers, labels_used=False)


def _cpu_bf16() -> bool:
    from .finetune import bf16_supported

    return bf16_supported()
