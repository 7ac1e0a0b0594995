"""Compression executor: apply a CompressionPlan, compensate, fine-tune, save and export.

``apply_plan(model, plan, example_input=...)`` returns a new, physically smaller model;
``refit_consumers`` / ``refit_head`` / ``recalibrate_bn`` compensate without training; ``reconstruct``
trains the model to reproduce the base on unlabelled images; ``finetune`` (optionally distilled) /
``train_head`` train; ``save_compressed`` / ``load_compressed`` round-trip arch + plan + weights.
"""
from .compensate import recalibrate_bn, refit_consumers, refit_head
from .export import export_onnx, export_torchscript, load_compressed, save_compressed
from .finetune import bf16_supported, cifar_augment, evaluate, finetune, preload, train_head
from .prune import apply_plan, find_classifier, plan_cost, rebuild
from .reconstruct import kd_loss, reconstruct

__all__ = [
    "apply_plan",
    "bf16_supported",
    "cifar_augment",
    "evaluate",
    "export_onnx",
    "export_torchscript",
    "find_classifier",
    "finetune",
    "kd_loss",
    "load_compressed",
    "plan_cost",
    "preload",
    "rebuild",
    "reconstruct",
    "recalibrate_bn",
    "refit_consumers",
    "refit_head",
    "save_compressed",
    "train_head",
]
