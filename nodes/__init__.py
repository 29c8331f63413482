"""ComfyUI nodes of the personalization pack."""
