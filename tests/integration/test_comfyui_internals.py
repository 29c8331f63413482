"""One test per ComfyUI internal the pack relies on beyond ComfyUI's public behaviour.

When ComfyUI changes one of them, the test for it fails with the internal's name in its
message, and nodes/comfy_bridge/ is the one place to mend. (Public behaviour the pack relies
on, such as CLIP Text Encode's conditioning or LoraLoader reading our files, is checked by the
other tests.) nodes/comfy_bridge/internals.py checks the same shapes at run time, before work.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from harness import pack_module, run_node

internals = pack_module("nodes.comfy_bridge.internals")
layers = pack_module("nodes.comfy_bridge.layers")
tokens = pack_module("nodes.comfy_bridge.tokens")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
text_encoders = pack_module("nodes.comfy_bridge.text_encoders")
common = pack_module("nodes.training.common")


def test_internals_the_pack_checks_at_run_time_hold_here():
    internals.require()
    for internal, check in internals.STATIC_CHECKS:
        assert check() is None, f"{internal}: {check()}"


def test_a_changed_internal_is_refused_with_its_name(monkeypatch):
    monkeypatch.setattr(internals, "STATIC_CHECKS", [("comfy.example.thing", lambda: "has gone")])
    internals.require.cache_clear()
    try:
        with pytest.raises(internals.ComfyUIIncompatible, match=r"comfy\.example\.thing has gone.*v0\.3\.64.*v0\.28\.0"):
            internals.require()
    finally:
        internals.require.cache_clear()


def test_cast_bias_weight_gives_the_weights_a_layer_computes_with():
    """comfy.ops.cast_bias_weight(module, dtype=, device=, bias_dtype=) -> (weight, bias): the stored
    tensor itself when nothing changes it, a cast in the asked dtype, and weight_function applied."""
    import comfy.ops

    with torch.inference_mode():
        layer = comfy.ops.manual_cast.Linear(4, 3, dtype=torch.float16)
        layer.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float16), requires_grad=False)
        layer.bias = torch.nn.Parameter(torch.randn(3, dtype=torch.float16), requires_grad=False)
    name = "comfy.ops.cast_bias_weight"
    weight, bias = layers.borrow(layer, torch.float16, torch.device("cpu"))
    assert weight.data_ptr() == layer.weight.data_ptr() and bias.data_ptr() == layer.bias.data_ptr(), (
        f"{name}: no copy when dtype and device already match"
    )
    layers.release(layer, weight, bias)
    if layers.OFFLOADABLE:  # v0.28+: the offloadable form and its uncast
        raw = comfy.ops.cast_bias_weight(layer, dtype=torch.float16, device=torch.device("cpu"), bias_dtype=torch.float16, offloadable=True)
        assert len(raw) == 3, f"{name}(offloadable=True): (weight, bias, offload stream)"
        comfy.ops.uncast_bias_weight(layer, *raw)
    weight, bias = layers.cast(layer, torch.float32, torch.device("cpu"))
    assert weight.dtype == bias.dtype == torch.float32 and torch.equal(weight, layer.weight.float()), (
        f"{name}: the cast to the input's dtype"
    )
    layer.weight_function = [lambda w: w * 2]
    weight, _ = layers.cast(layer, torch.float32, torch.device("cpu"))
    assert torch.equal(weight, layer.weight.float() * 2), f"{name}: weight_function (patches applied on the fly) in the weights"
    assert layers.is_cast_layer(layer) and not layers.is_cast_layer(torch.nn.Linear(2, 2)), (
        "comfy.ops cast layers: weight_function / bias_function"
    )


def test_diffusion_model_wrappers_route_the_forward(sd15):
    """comfy.patcher_extension DIFFUSION_MODEL wrappers in model_options: apply_model calls them with
    an executor whose .original is a bound method of the diffusion model."""
    with torch.inference_mode(False):
        unet = diffusion_model.DiffusionModelForTraining(sd15["model"], torch.float32)
        unet.load()
        called = []
        original_target = unet.route.target
        unet.route.target = type("Spy", (), {"__getattr__": lambda self, n: (called.append(n), getattr(original_target, n))[1]})()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            unet.denoise(torch.randn(1, 4, 8, 8, generator=g), unet.sigmas(torch.tensor([500])), torch.randn(1, 77, 768, generator=g))
    assert unet.route.calls == 1 and called == ["_forward"], f"comfy.patcher_extension DIFFUSION_MODEL: wrapper called {called}"
    assert "forward" not in vars(sd15["model"].model.diffusion_model), "the shared diffusion model is not patched"


def test_apply_model_runs_the_diffusion_model_slot_on_inputs_in_manual_cast_dtype(sd15):
    """BaseModel.apply_model calls ``self.diffusion_model`` (the slot SD3's training view stands in,
    for models whose forward runs no DIFFUSION_MODEL wrappers) on inputs cast to
    ``manual_cast_dtype`` (which training in another dtype than the model's sets for its calls)."""
    base = sd15["model"].model
    seen = {}

    class Probe(torch.nn.Module):
        dtype = torch.float32

        def forward(self, x, timesteps, context=None, **kwargs):
            seen.update(x=x.dtype, context=context.dtype)
            return torch.zeros_like(x)

    original, previous = base._modules["diffusion_model"], base.manual_cast_dtype
    base._modules["diffusion_model"] = Probe()
    base.manual_cast_dtype = torch.float64
    try:
        with torch.inference_mode():
            base.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), c_crossattn=torch.zeros(1, 77, 768))
    finally:
        base._modules["diffusion_model"], base.manual_cast_dtype = original, previous
    assert seen == {"x": torch.float64, "context": torch.float64}, "BaseModel.diffusion_model / manual_cast_dtype in apply_model"


def test_embedding_syntax_reads_files_from_the_tokenizers_embedding_directory(sd15, tmp_path):
    """comfy.sd1_clip.SDTokenizer: embedding_directory may be a list of folders; `embedding:NAME`
    puts the file's rows into the tokens as tensors (what trigger words are bound through)."""
    clip = sd15["clip"]
    [sub] = tokens.sub_tokenizers(clip)
    for attribute in internals.TOKENIZER_ATTRIBUTES:
        assert hasattr(sub, attribute), f"comfy.sd1_clip.SDTokenizer.{attribute} is gone"
    rows = torch.randn(2, 768, generator=torch.Generator().manual_seed(4))
    safetensors.torch.save_file({"clip_l": rows}, str(tmp_path / "probe.safetensors"))
    patched = copy.copy(sub)
    patched.embedding_directory = [str(tmp_path)]
    chunks = patched.tokenize_with_weights("a photo of embedding:probe here")
    found = [t for chunk in chunks for t, *_ in chunk if isinstance(t, torch.Tensor)]
    assert len(found) == 2 and torch.equal(torch.stack(found), rows), (
        "comfy.sd1_clip.SDTokenizer.tokenize_with_weights: embedding:NAME from a folder of embedding_directory"
    )


def test_token_ids_and_vocabulary_come_from_the_tokenizer(sd15):
    """comfy.sd1_clip.SDTokenizer.tokenizer (Hugging Face), tokens_start, tokenizer_adds_end_token."""
    clip = sd15["clip"]
    ids = tokens.word_token_ids(clip, "a photo of a cat")["clip_l"]
    vocab = tokens.first_vocabulary(clip)
    assert ids == [vocab[w + "</w>"] for w in ("a", "photo", "of", "a", "cat")], (
        "comfy.sd1_clip.SDTokenizer: tokenizer / tokens_start / tokenizer_adds_end_token"
    )
    public = [t for chunk in clip.tokenize("a photo of a cat", return_word_ids=True)["l"] for t, _, word in chunk if word > 0]
    assert public == ids, "comfy.sd1_clip.SDTokenizer: word ids of the public tokenize() agree"


def test_input_embeddings_of_a_text_encoder(sd15):
    """cond_stage_model.<clip_l>.transformer.get_input_embeddings(): the token table init vectors come from."""
    clip = sd15["clip"]
    rows = tokens.token_embedding_rows(clip, "cat")["clip_l"]
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    assert torch.equal(rows[0], table[tokens.first_token_ids(clip, "cat")[0]].float()), (
        "comfy text encoders: transformer.get_input_embeddings()"
    )


def test_a_clip_clone_encodes_with_the_cond_stage_model_it_holds(sd15):
    """comfy.sd.CLIP.clone() then .cond_stage_model replaced: encode_from_tokens runs the new one
    (what the training views of the text encoder rely on)."""
    clip = sd15["clip"]
    with torch.inference_mode(False), torch.no_grad():
        encoder = text_encoders.TrainingTextEncoder(clip, own_dtype=torch.float32)
        encoder.view.get_submodule("clip_l.transformer.text_model.final_layer_norm").bias.add_(1.0)
        tuned, _ = encoder.encode(["a photo of a cat"])
        plain, _ = text_encoders.encode_prompt(clip, "a photo of a cat")
    assert not torch.equal(tuned, plain), "comfy.sd.CLIP: encode_from_tokens uses the clone's cond_stage_model"
    torch.testing.assert_close(tuned - 1.0, plain, rtol=1e-5, atol=1e-4, msg="comfy.sd.CLIP: only the changed layer differs")


def test_patches_a_model_carries_are_part_of_its_identity(sd15, tmp_path):
    """ModelPatcher.patches ({key: [(strength, patch, ...)]}): a LoRA loaded before training
    changes the identity class images are cached under."""
    import folder_paths

    model = sd15["model"]
    keys = diffusion_model.unet_lora_weights(model, "attention")
    key = next(iter(keys))
    name = pack_module("nodes.comfy_bridge.saving").unet_lora_names(model, [key])[key]
    lora = {f"{name}.lora_up.weight": torch.ones(keys[key][0], 1) * 0.01, f"{name}.lora_down.weight": torch.ones(1, keys[key][1]) * 0.01}
    target = folder_paths.get_folder_paths("loras")[0] + "/identity-probe.safetensors"
    safetensors.torch.save_file(lora, target)
    patched, _ = run_node(
        "LoraLoader", model=model, clip=sd15["clip"], lora_name="identity-probe.safetensors", strength_model=1.0, strength_clip=0.0
    )
    assert patched.patches, "comfy.model_patcher.ModelPatcher.patches: LoraLoader's patches are there"
    assert diffusion_model.model_identity(patched) != diffusion_model.model_identity(model), "ModelPatcher.patches: part of the identity"
    assert diffusion_model.model_identity(model) == diffusion_model.model_identity(model.clone())


def test_checkpoint_saving_is_told_apart_by_a_feature():
    """comfy.sd.save_checkpoint: ComfyUI with CLIP.state_dict_for_saving patches lazily; before it,
    the CLIP must be loaded and patched first (saving.save_checkpoint_file does either)."""
    import inspect

    import comfy.sd

    assert set(inspect.signature(comfy.sd.save_checkpoint).parameters) >= {"output_path", "model", "clip", "vae", "metadata"}, (
        "comfy.sd.save_checkpoint(output_path, model, clip, vae, metadata)"
    )
