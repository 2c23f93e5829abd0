"""ReDi and T-Stitch for ComfyUI: retrieval-accelerated and model-stitched diffusion sampling.

ComfyUI imports this file (as a package) and calls `comfy_entrypoint`. Outside ComfyUI (the
`kb_tools` command line, plain Python) importing the pack must not need ComfyUI, hence the guards.
"""
# ComfyUI serves this folder at /extensions/<pack folder>/: the canvas-feedback script and the
# node help pages (docs/<NodeName>.md) the front end opens from a node's "help" button.
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not inside ComfyUI: kb_tools still works on its own
    ComfyExtension = None

# No package context: imported as a plain file, e.g. by pytest collecting a clone folder whose
# name is not a Python name (comfyui-redi); the nodes are then loaded by the tests themselves.
if ComfyExtension is not None and __package__:
    from .nodes import ReDiExtension

    async def comfy_entrypoint() -> ComfyExtension:
        """ComfyUI's V3 entry point: returns the extension that lists this pack's nodes."""
        return ReDiExtension()
