"""Test environment only: lets the registry's CUDA torchvision import next to a CPU torch.

torchvision's Python side asks for the `torchvision::nms` schema at import; the CUDA
build's compiled library cannot load without CUDA, so the schema is missing. Declaring
the two schemas lets the pure-Python parts (all ComfyUI needs at start-up) import.
The declaration runs when torchvision is first imported, so other processes of the
environment do not pay for importing torch at start-up.
"""
import sys


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch

                if torch.version.cuda is None:
                    _lib = torch.library.Library("torchvision", "DEF")
                    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    sys.modules[__name__]._keep = _lib  # a Library is unregistered when collected
            except Exception:  # already defined, or torch missing: nothing to do
                pass
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
