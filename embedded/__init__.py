"""The embedded default: two toy caption-conditional diffusion models on 16x16 crops, shipped with the pack.

captions      the caption distribution, prompt parsing, the train / held-out splits
text_encoder  the fixed text encoder (prompt -> CONDITIONING)
rendering     the real crops data the models and the judge learn from
models        ComfyUI model configs, construction and the shipped weights
judge         the judge CNN that scores generated crops (features for FD, condition readings)
sampling      plain, ReDi and T-Stitch runs and KB builds through kb_tools (the one place that samples)
train, demo   the command-line entry points
"""
