"""Model architectures (CIFAR ResNets, CIFAR VGG-16-BN, torchvision passthrough, user code) and safe loading.

``build_model(arch, num_classes, arch_kwargs)`` makes a fresh network by name, ``torchvision:<name>``
or the user's ``path/to/file.py:Class`` / ``package.module:Class``; ``load_model(path)`` reads a
checkpoint with ``weights_only=True`` and returns a ``LoadedModel`` in eval mode.
"""
from .cifar_resnet import CIFAR_RESNET_DEPTHS, BasicBlock, CifarResNet, ShortcutA, cifar_resnet
from .loading import (
    LoadedModel,
    ModelLoadError,
    available_archs,
    build_model,
    infer_arch,
    is_user_code,
    load_model,
    register_arch,
)
from .small_cnn import SmallCNN
from .vgg import VGG, VGG16_CFG, vgg16_bn_cifar

__all__ = [
    "BasicBlock",
    "CIFAR_RESNET_DEPTHS",
    "CifarResNet",
    "LoadedModel",
    "ModelLoadError",
    "ShortcutA",
    "SmallCNN",
    "VGG",
    "VGG16_CFG",
    "available_archs",
    "build_model",
    "cifar_resnet",
    "infer_arch",
    "is_user_code",
    "load_model",
    "register_arch",
    "vgg16_bn_cifar",
]
