"""ReDi knowledge-base library: format, FAISS index, retrieval, blending, schedule bookkeeping.

Importing kb_tools never imports ComfyUI; only the ComfyUI-side modules do (`comfy_sampling`,
`guiders`, `plain`, `redi_sampler`, `build`, `redi`, and `tstitch` when it samples).
"""
