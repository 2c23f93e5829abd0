"""ComfyUI nodes (V3 schema). Thin layer over kb_tools: no math lives here."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .custom_sampling import NODES as CUSTOM_SAMPLING_NODES
from .learning import NODES as LEARNING_NODES
from .redi import NODES as REDI_NODES
from .tstitch import NODES as TSTITCH_NODES


class ReDiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*REDI_NODES, *CUSTOM_SAMPLING_NODES, *LEARNING_NODES, *TSTITCH_NODES]
