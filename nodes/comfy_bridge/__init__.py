"""The one bridge to ComfyUI: every touch of ComfyUI goes through these modules, by concern.

- ``folders``: models, input and temp folders (``folder_paths``).
- ``tokens``: trigger words bound through ComfyUI's ``embedding:`` syntax; vocabulary and token rows.
- ``layers``: which modules are ComfyUI's cast layers, and the weights they compute with.
- ``diffusion_model``: the MODEL prepared for training (a routed training view), LoRA targets, identity.
- ``text_encoders``: conditioning, and the CLIP on a training view.
- ``sampling``: previews and class images with ComfyUI's own sampler.
- ``devices``: device capabilities and loading through ``comfy.model_management``.
- ``progress``: the node's progress bar, live messages and Cancel.
- ``saving``: output MODEL/CLIP clones, LoRA names, files written and read.
- ``internals``: the private internals still relied on, checked before use.

A ComfyUI change is mended here; nothing else in the pack imports ComfyUI.
"""
