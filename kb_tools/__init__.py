"""ReDi knowledge-base library: format, FAISS index, retrieval, blending, schedule bookkeeping.

Importing kb_tools never imports ComfyUI; only `comfy_sampling`, `redi` and the `build`
command do.
"""
