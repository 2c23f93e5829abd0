"""Test environment only: lets the registry's CUDA torchvision import next to a CPU torch.

torchvision's Python side asks for the `torchvision::nms` schema at import; the CUDA
build's compiled library cannot load without CUDA, so the schema is missing. Declaring
the two schemas lets the pure-Python parts (all ComfyUI needs at start-up) import.
"""
try:
    import torch

    if torch.version.cuda is None:
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:  # already defined, or torch missing: nothing to do
    pass
