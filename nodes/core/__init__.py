"""The pure training core: math, optimizers, adapters, training views, file formats, images, the loop.

Nothing here imports ComfyUI (a test imports every module with ``comfy`` unimportable), so it
runs the same in ComfyUI's process, in a headless worker, and in unit tests. Modules import
each other relatively only, so the package works under whatever name the pack is loaded.
"""
