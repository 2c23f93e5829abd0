"""ComfyUI nodes (V3 schema). Thin layer over kb_tools: no math lives here.

One node family per module, each importing only kb_tools' public names, common.py (shared inputs,
tooltips, the KB folders) and feedback.py (what goes on the canvas); no node module imports another.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibrated import NODES as CALIBRATED_NODES
from .custom_sampling import NODES as CUSTOM_SAMPLING_NODES
from .knowledge_base import NODES as KNOWLEDGE_BASE_NODES
from .learning import NODES as LEARNING_NODES
from .redi_chain import NODES as REDI_CHAIN_NODES
from .redi_sampler import NODES as REDI_SAMPLER_NODES
from .tstitch import NODES as TSTITCH_NODES


class ReDiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*KNOWLEDGE_BASE_NODES, *REDI_CHAIN_NODES, *REDI_SAMPLER_NODES, *CUSTOM_SAMPLING_NODES, *LEARNING_NODES,
                *TSTITCH_NODES, *CALIBRATED_NODES]
