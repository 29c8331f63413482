"""The trainers: Textual Inversion and DreamBooth, each a step on the shared skeleton.

They join the pure core (``..core``) to ComfyUI through the bridge (``..comfy_bridge``) and never
import ComfyUI themselves. They need no server: a headless process that loads the models with
``comfy.sd`` runs them as they are.
"""
