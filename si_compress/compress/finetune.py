"""Evaluation, head training and fine-tuning of a compressed model (on the CPU or a CUDA device).

- :func:`preload` decodes a dataset once into tensors, so repeated evaluations skip JPEG decoding.
- :func:`cifar_augment` is the standard CIFAR augmentation (4-px padded random crop + horizontal
  flip) applied per batch on tensors, so a preloaded dataset can still be augmented.
- :func:`train_head` trains only the classifier on features computed once (frozen extractor).
- :func:`finetune` is SGD + Nesterov with a per-step cosine schedule; ``bf16=True`` runs forward
  and backward under ``torch.autocast(device type, dtype=torch.bfloat16)`` where the device has native
  bf16 (a CUDA GPU that supports it, a CPU with AMX or AVX512-BF16), and silently stays in float32
  elsewhere.

``device=`` (each function): run there (``"cpu"``, ``"cuda"``, ``"auto"``; ``si_compress._device``);
None runs on the model's own device. The model (and teacher) come back to where they were.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import _device
from .prune import find_classifier

__all__ = ["evaluate", "train_head", "finetune", "preload", "cifar_augment", "bf16_supported"]


def bf16_supported() -> bool:
    """True when /proc/cpuinfo lists ``amx_bf16`` or ``avx512_bf16`` (native bf16 matmuls)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def _bf16_on(bf16: bool, dev: torch.device) -> bool:
    """bf16 autocast only where the device computes in bf16 natively."""
    if not bf16:
        return False
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bf16_supported()


def _autocast(bf16: bool, dev: torch.device = torch.device("cpu")):
    if _bf16_on(bf16, dev):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _xy(item):
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError("the loader must yield (inputs, labels) batches")
    return item[0], item[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, bf16: bool = False, device=None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode; its training flag is restored) on ``device``."""
    dev = _device.target(device, model)
    was = model.training
    model.eval()
    correct = total = 0
    try:
        with _device.on_device(dev, model):
            for item in loader:
                x, y = _xy(item)
                x = _device.to_device(x, dev)
                with _autocast(bf16, dev):
                    logits = model(x)
                correct += int((logits.argmax(1).cpu() == torch.as_tensor(y).cpu()).sum())
                total += int(torch.as_tensor(y).numel())
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / total


def preload(data, indices=None, *, batch_size: int | None = None, num_workers: int = 0) -> TensorDataset:
    """Decode a Dataset (or a DataLoader's dataset) once: TensorDataset(x, labels int64).

    ``x`` keeps the dtype the dataset yields (float32 after ToTensor/Normalize, uint8 if the
    transform leaves bytes); ``indices`` selects a subset in the given order. Memory: N x C x H x W
    elements (CIFAR float32: 12 KiB per image). ``batch_size``: decoding batch (default: the
    loader's, else 256).
    """
    dataset: Dataset = data.dataset if isinstance(data, DataLoader) else data
    if batch_size is None:
        batch_size = (data.batch_size if isinstance(data, DataLoader) else None) or 256
    if indices is not None:
        dataset = Subset(dataset, [int(i) for i in indices])
    xs = ys = None
    n = 0
    # A fresh sequential loader: the caller's loader may shuffle or drop the last batch. The images go into one
    # tensor allocated at the first batch, so the peak is the cache itself, not twice it.
    for item in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x, y = _xy(item)
        if xs is None:
            xs = x.new_empty((len(dataset), *x.shape[1:]))
            ys = torch.empty(len(dataset), dtype=torch.int64)
        xs[n:n + len(x)] = x
        ys[n:n + len(x)] = torch.as_tensor(y, dtype=torch.int64)
        n += len(x)
    if xs is None:
        raise ValueError("preload: the dataset is empty")
    return TensorDataset(xs[:n], ys[:n])


def cifar_augment(x: torch.Tensor, *, padding: int = 4, flip: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the zero-padded batch back to (H, W) plus random horizontal flip, per sample.

    (N, C, H, W) -> (N, C, H, W). Zero padding happens in the tensor's own space (for normalized
    inputs that is the mean colour, not black as torchvision's RandomCrop on raw images).
    """
    if x.ndim != 4:
        raise ValueError(f"cifar_augment expects a (N, C, H, W) batch; got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    # the random draws on the CPU (a CPU generator), the indices then on the batch's device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = oy[:, None] + torch.arange(h)                       # (N, H)
    cols = ox[:, None] + torch.arange(w)                       # (N, W)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]   # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _cosine(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _check_epochs(epochs) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    return epochs


def train_head(model: nn.Module, loader, *, epochs: int, lr: float = 0.01, momentum: float = 0.9,
               weight_decay: float = 5e-4, seed: int = 0, device=None) -> list[dict]:
    """Train only the classifier head (``find_classifier``) on features computed once.

    The feature extractor runs once in eval mode over ``loader`` (augmentation in the loader is
    therefore seen once, not per epoch); the head is then trained with SGD + Nesterov and a cosine
    schedule on the cached (N, in_features) features, reshuffled each epoch with batches of the
    loader's size. The head's first linear layer is trained on standardised features
    z = (x - mean) / std and the mean and std are folded back into its weight and bias afterwards
    (a bias is added when it had none), so the head reads raw features as before. Returns per-epoch ``{"epoch", "loss", "acc"}`` (on the cached features).
    ``device``: where the features are computed and the head trained (None: the model's own).
    """
    epochs = _check_epochs(epochs)
    dev = _device.target(device, model)
    with _device.on_device(dev, model):
        return _train_head(model, loader, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           seed=seed, dev=dev)


def _first_linear(head: nn.Module) -> nn.Linear | None:
    """The head's first nn.Linear when only Flatten/Identity run before it (so its input is the head's
    input, flattened), else None."""
    if isinstance(head, nn.Linear):
        return head
    for c in head.children() if isinstance(head, nn.Sequential) else ():
        if isinstance(c, nn.Linear):
            return c
        if not isinstance(c, (nn.Flatten, nn.Identity)):
            return None
    return None


def _train_head(model, loader, *, epochs, lr, momentum, weight_decay, seed, dev) -> list[dict]:
    name, head = find_classifier(model)
    feats, labels, seen = [], [], {}
    hook = head.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in loader:
                x, y = _xy(item)
                model(_device.to_device(x, dev))
                feats.append(seen["x"].float())
                labels.append(_device.to_device(torch.as_tensor(y, dtype=torch.int64), dev))
    finally:
        hook.remove()
    if not feats:
        raise ValueError("train_head: the loader yielded no batches")
    X, Y = torch.cat(feats), torch.cat(labels)
    bs = getattr(loader, "batch_size", None) or 128
    # SGD on raw features diverges when they sit far from 0 on a small spread (measured: a separable
    # 1-D feature at 7.8-12.8, loss 39 -> 163 at lr 0.1); train the first linear layer on
    # standardised features z = (x - mu) / sd and fold mu, sd back afterwards (same function).
    first = _first_linear(head)
    mu = X.mean(0)
    sd = X.std(0, unbiased=False).clamp_min(1e-6 * max(1.0, float(X.abs().max())))
    if first is not None and first.in_features == X[0].numel():
        with torch.no_grad():   # the same function on z: W z + (b + W mu) with W <- W sd
            if first.bias is None:
                first.bias = nn.Parameter(torch.zeros(first.out_features, dtype=first.weight.dtype,
                                                      device=first.weight.device))
            first.bias.add_(first.weight @ mu.reshape(-1))
            first.weight.mul_(sd.reshape(-1))
        X = (X - mu) / sd
    else:
        first = None
    params = list(head.parameters())
    flags = [p.requires_grad for p in params]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    steps = epochs * math.ceil(len(X) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps))
    gen = torch.Generator().manual_seed(seed)
    history = []
    try:
        for p in params:
            p.requires_grad_(True)
        head.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(X), generator=gen).to(dev)   # drawn on the CPU: same order on any device
            loss_sum = correct = 0.0
            for i in range(0, len(X), bs):
                idx = perm[i:i + bs]
                logits = head(X[idx])
                loss = F.cross_entropy(logits, Y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += float((logits.argmax(1) == Y[idx]).sum())
            history.append({"epoch": epoch + 1, "loss": loss_sum / len(X), "acc": correct / len(X)})
    finally:
        if first is not None:   # back to raw features: W x + b with W <- W / sd, b <- b - W mu
            with torch.no_grad():
                first.weight.div_(sd.reshape(-1))
                first.bias.sub_(first.weight @ mu.reshape(-1))
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was)
    return history


def finetune(model: nn.Module, train_loader, *, epochs: int, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 5e-4, nesterov: bool = True, schedule: str = "cosine",
             augment: Callable[[torch.Tensor], torch.Tensor] | None = None, bf16: bool = False,
             max_steps: int | None = None, teacher: nn.Module | None = None, kd_weight: float = 0.5,
             temperature: float = 4.0, progress: Callable[[dict], None] | None = None,
             device=None, channels_last: bool | None = None) -> list[dict]:
    """Fine-tune all parameters with SGD; the learning rate follows ``schedule`` per step.

    ``schedule``: ``"cosine"`` (lr -> 0 over ``epochs * len(train_loader)`` steps) or
    ``"constant"``. ``augment``: applied to each input batch (e.g. :func:`cifar_augment`).
    ``bf16``: autocast to bfloat16 when the CPU supports it natively. ``max_steps``: stop each
    epoch after that many batches (for quick runs). ``teacher``: distil from this model (eval mode,
    unchanged): loss = (1 - kd_weight) * CE(labels) + kd_weight * T^2 * KL(teacher || student) at
    temperature T (``reconstruct.kd_loss``). ``progress(record)`` is called after each
    epoch. ``device``: where model and teacher train and run (None: the model's own); both come
    back to where they were. ``channels_last``: train in the channels-last layout (None: on the CPU, where it
    is faster; ``_device.use_channels_last``); parameters come back in their own layout. Returns per-epoch
    ``{"epoch", "loss", "acc", "lr", "seconds", "bf16", "steps", "teacher", "channels_last"}``; the model is
    left in eval mode.
    """
    epochs = _check_epochs(epochs)
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}")
    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    if teacher is not None and not (0.0 <= kd_weight <= 1.0):
        raise ValueError(f"kd_weight must be in [0, 1]; got {kd_weight!r}")
    dev = _device.target(device, model)
    cl = _device.use_channels_last(channels_last, dev)
    with _device.on_device(dev, model, teacher), _device.channels_last(cl, model, teacher):
        return _finetune(model, train_loader, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, schedule=schedule, augment=augment, bf16=bf16, max_steps=max_steps,
                         teacher=teacher, kd_weight=kd_weight, temperature=temperature, progress=progress, dev=dev,
                         channels_last=cl)


def _finetune(model, train_loader, *, epochs, lr, momentum, weight_decay, nesterov, schedule, augment, bf16,
              max_steps, teacher, kd_weight, temperature, progress, dev, channels_last) -> list[dict]:
    from .reconstruct import kd_loss

    t_modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        teacher.eval()
    use_bf16 = _bf16_on(bf16, dev)
    per_epoch = len(train_loader) if max_steps is None else min(len(train_loader), max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _cosine(epochs * per_epoch) if schedule == "cosine" else (lambda step: 1.0))
    history = []
    try:
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            loss_sum = correct = total = 0.0
            steps = 0
            for step, item in enumerate(train_loader):
                if step >= per_epoch:
                    break
                steps += 1
                x, y = _xy(item)
                x = _device.to_device(_device.as_layout(x, channels_last), dev)
                y = _device.to_device(torch.as_tensor(y), dev)
                if augment is not None:
                    x = _device.as_layout(augment(x), channels_last)
                with _autocast(use_bf16, dev):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x)
                        loss = (1.0 - kd_weight) * loss + kd_weight * kd_loss(logits, t_logits, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += float((logits.argmax(1) == y).sum())
                total += len(y)
            record = {"epoch": epoch + 1, "loss": loss_sum / max(total, 1), "acc": correct / max(total, 1),
                      "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "bf16": use_bf16,
                      "teacher": teacher is not None, "steps": steps, "channels_last": channels_last}
            history.append(record)
            if progress is not None:
                progress(record)
    finally:
        model.eval()
        for m, mode in t_modes:
            m.training = mode
    return history
