"""Train Textual Inversion on the tiny models, through ComfyUI's own loaders and nodes."""

from __future__ import annotations

import hashlib
import uuid

import comfy.model_management
import comfy.utils
import pytest
import safetensors.torch
import torch
from harness import cancel_at_step, pack_module, run_node, textual_inversion_inputs

tokens = pack_module("nodes.comfy_bridge.tokens")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
text_encoders = pack_module("nodes.comfy_bridge.text_encoders")
common = pack_module("nodes.training.common")
ef = pack_module("nodes.core.embedding_file")
ti = pack_module("nodes.training.textual_inversion")
graph_types = pack_module("nodes.graph_types")
TRAIN = graph_types.TRAIN_TEXTUAL_INVERSION
APPLY = graph_types.APPLY_EMBEDDING


def _images(count: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 1, 1, 3, generator=g)
    return (base + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _state_hash(*modules: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- gradients


def _directional_check(loss_fn, params: list[torch.Tensor], h: float = 0.1, seed: int = 0) -> tuple[float, float]:
    """Autograd's directional derivative of loss_fn at params vs finite differences.

    One random direction over all params jointly. The numeric side is Richardson-extrapolated
    central differences at h and h/2: its truncation error is O(h^4), so a large h keeps fp32
    rounding negligible without the curvature error of a plain central difference.
    """
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in directions))
    directions = [d / norm for d in directions]

    def shifted(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions, strict=False):
                p.add_(t * d)
            value = float(loss_fn())
            for p, d in zip(params, directions, strict=False):
                p.sub_(t * d)
        return value

    with torch.inference_mode(False), torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params)
        analytic = float(sum((gr * d).sum() for gr, d in zip(grads, directions, strict=False)))
        central = {step: (shifted(step) - shifted(-step)) / (2 * step) for step in (h, h / 2)}
    return analytic, (4 * central[h / 2] - central[h]) / 3


def _text_encoder_case(clip, trigger="<w>"):
    widths = tokens.text_encoder_widths(clip)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode(False):
        vectors = {k: torch.nn.Parameter(torch.randn(2, w, generator=g) * 0.02) for k, w in widths.items()}
        encoder = text_encoders.TrainingTextEncoder(clip, trainable_words={trigger: vectors})
        with torch.no_grad():
            cond, pooled = encoder.encode([f"a photo of {trigger} on a beach"])
            target = torch.randn(cond.shape, generator=g) * cond.std() + cond
            pooled_target = None if pooled is None else torch.randn(pooled.shape, generator=g) + pooled
    return vectors, encoder, target, pooled_target


def _encoder_loss(encoder, target, pooled_target, trigger="<w>"):
    cond, pooled = encoder.encode([f"a photo of {trigger} on a beach"])
    loss = (cond - target).pow(2).mean()
    if pooled_target is not None:
        loss = loss + (pooled - pooled_target).pow(2).mean()
    return loss


@pytest.mark.parametrize("family", ["sd15", "sd15_clip_skip", "sd2", "sdxl"])
def test_text_encoder_gradient_matches_finite_differences(family, request):
    clip = request.getfixturevalue("sdxl_clip") if family == "sdxl" else request.getfixturevalue(family.replace("_clip_skip", ""))["clip"]
    if family.endswith("clip_skip"):
        (clip,) = run_node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)
    vectors, encoder, target, pooled_target = _text_encoder_case(clip)
    analytic, numeric = _directional_check(lambda: _encoder_loss(encoder, target, pooled_target), list(vectors.values()))
    assert abs(numeric) > 1e-7, "the loss must depend on the vectors"
    assert analytic == pytest.approx(numeric, rel=0.01, abs=1e-8), family


@pytest.mark.parametrize("family", ["sd15", "sd15_clip_skip", "sd2", "sdxl"])
def test_training_conditioning_equals_clip_text_encode(family, request, embeddings_dir):
    clip = request.getfixturevalue("sdxl_clip") if family == "sdxl" else request.getfixturevalue(family.replace("_clip_skip", ""))["clip"]
    if family.endswith("clip_skip"):
        (clip,) = run_node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)
    vectors, encoder, _, _ = _text_encoder_case(clip)
    name = f"eq-{uuid.uuid4().hex[:8]}"
    ef.write_embedding(ef.EmbeddingFile({k: v.detach() for k, v in vectors.items()}, "<w>"), embeddings_dir, name)
    prompt = "a photo of {} on a beach"
    with torch.inference_mode(False), torch.no_grad():
        ours, ours_pooled = encoder.encode([prompt.format("<w>")])
    (conditioning,) = run_node("CLIPTextEncode", clip=clip, text=prompt.format(f"embedding:{name}"))
    # Same code computes both; fp32 rounding is the only allowed difference.
    torch.testing.assert_close(ours, conditioning[0][0], rtol=1e-5, atol=1e-5)
    if ours_pooled is not None:
        torch.testing.assert_close(ours_pooled, conditioning[0][1]["pooled_output"], rtol=1e-5, atol=1e-5)


def test_unet_gradient_matches_finite_differences(sd15):
    with torch.inference_mode(False):
        unet = diffusion_model.DiffusionModelForTraining(sd15["model"], torch.float32)
        unet.load()
        g = torch.Generator().manual_seed(3)
        latent = torch.randn(1, 4, 8, 8, generator=g)
        noise = torch.randn(1, 4, 8, 8, generator=g)
        sigma = unet.sigmas(torch.tensor([500]))
        context = torch.nn.Parameter(torch.randn(1, 77, 768, generator=g))
        x = unet.noisy(latent, noise, sigma)

        def loss():
            return (
                pack_module("nodes.core.training_math")
                .prediction_loss(unet.denoise(x, sigma, context), latent, sigma, unet.prediction)
                .mean()
            )

    # The context has norm ~240: a step of 5 is small for it, and large enough that fp32
    # rounding of the loss stays far below the derivative.
    analytic, numeric = _directional_check(loss, [context], h=5.0)
    assert analytic == pytest.approx(numeric, rel=0.01)


# --------------------------------------------------------------------------- the node


def test_full_run_through_the_node(sd15, embeddings_dir):
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    before = _state_hash(model.model, clip.cond_stage_model, vae.first_stage_model)
    settings = textual_inversion_inputs(steps=4, save_every=2, vectors_per_token=2, flip=True)
    embedding, bound, curve, file_name = run_node(TRAIN, model=model, clip=clip, vae=vae, images=_images(3), **settings)

    assert _state_hash(model.model, clip.cond_stage_model, vae.first_stage_model) == before, "frozen weights changed"
    for module in (model.model, clip.cond_stage_model):
        assert [n for n, p in module.named_parameters() if p.grad is not None] == [], "no gradient left on frozen weights"
    assert file_name == settings["trigger_word"].strip("<>") + ".safetensors"
    path = embeddings_dir / file_name
    on_disk = ef.read_embedding(path)
    assert torch.equal(on_disk.vectors["clip_l"], embedding.vectors["clip_l"]) and embedding.num_vectors == 2
    assert on_disk.metadata["steps"] == "4" and on_disk.metadata["trigger_word"] == settings["trigger_word"]
    assert curve.shape[0] == 1 and curve.shape[-1] == 3

    word = settings["trigger_word"]
    name = file_name.removesuffix(".safetensors")
    through_file = run_node("CLIPTextEncode", clip=clip, text=f"a photo of embedding:{name}")[0][0][0]
    through_output_clip = run_node("CLIPTextEncode", clip=bound, text=f"a photo of {word}")[0][0][0]
    applied, _ = run_node(
        APPLY,
        clip=clip,
        embedding_file=pack_module("nodes.apply_embedding_node").NO_FILE,
        trigger_word="",
        strength=1.0,
        embedding=embedding,
    )
    through_apply = run_node("CLIPTextEncode", clip=applied, text=f"a photo of {word}")[0][0][0]
    assert torch.equal(through_file, through_output_clip) and torch.equal(through_file, through_apply)
    # The original CLIP does not know the word.
    assert not torch.equal(run_node("CLIPTextEncode", clip=clip, text=f"a photo of {word}")[0][0][0], through_output_clip)


def test_known_answer_recovers_a_planted_vector(sd15):
    """Targets made by the frozen model with a planted vector: training from another word finds it."""
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    planted = tokens.token_embedding_rows(clip, "mountain")
    settings = ti.TextualInversionSettings(
        trigger_word="<planted>",
        init_text="cat",
        steps=40,
        learning_rate="0.01",
        batch_size=4,
        resolution=64,
        save=False,
        seed=1,
    )
    with torch.inference_mode():
        result = ti.train_textual_inversion(
            model,
            clip,
            vae,
            pack_module("nodes.core.training_images").TrainingImageSet.from_image_batch(_images(2)),
            settings,
            teacher_vectors=planted,
        )
    start = tokens.token_embedding_rows(clip, "cat")["clip_l"][0]
    target = planted["clip_l"][0]
    learned = result.embedding.vectors["clip_l"][0]
    before = torch.nn.functional.cosine_similarity(start, target, dim=0).item()
    after = torch.nn.functional.cosine_similarity(learned, target, dim=0).item()
    losses = result.losses.raw["loss"]
    print(f"cosine to planted: start {before:.3f} -> trained {after:.3f}; loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    # Measured: 0.037 -> 0.178 in 40 steps (the loss in function space falls ~4x). The random
    # text encoder is nearly blind to some directions of the vector, which the optimizer
    # then leaves where they are, so the cosine climbs slowly; a wrong gradient (ComfyUI's
    # stock backward) or a target not made from the planted vector would not move it at all.
    assert after > before + 0.08 and after > 3 * before
    assert sum(losses[-5:]) < sum(losses[:5]) / 2


def test_cancel_keeps_the_last_save_and_resume_continues(sd15, embeddings_dir):
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    settings = textual_inversion_inputs(steps=6, save_every=2)
    path = embeddings_dir / (settings["trigger_word"].strip("<>") + ".safetensors")
    with cancel_at_step(3):
        run_node(TRAIN, model=model, clip=clip, vae=vae, images=_images(2), **settings)
    saved = ef.read_embedding(path)
    assert saved.metadata["steps"] == "2", "the last good save is the one from step 2"

    resumed = textual_inversion_inputs(steps=3, trigger_word=settings["trigger_word"], overwrite=True, resume_from=path.name)
    embedding, _, _, _ = run_node(TRAIN, model=model, clip=clip, vae=vae, images=_images(2), **resumed)
    final = ef.read_embedding(path)
    assert final.metadata["steps"] == "5"
    assert not torch.equal(final.vectors["clip_l"], saved.vectors["clip_l"])
    assert torch.equal(final.vectors["clip_l"], embedding.vectors["clip_l"])


def test_sd2_path(sd2, embeddings_dir):
    settings = textual_inversion_inputs(steps=2, init_text="a dog")
    embedding, _, _, file_name = run_node(TRAIN, model=sd2["model"], clip=sd2["clip"], vae=sd2["vae"], images=_images(2), **settings)
    raw = safetensors.torch.load_file(str(embeddings_dir / file_name))
    assert list(raw) == ["emb_params"] and raw["emb_params"].shape == (1, 1024)
    assert embedding.model_family == "SD2.x"


def test_sdxl_path_trains_both_encoders(tiny_sdxl_model, sdxl_clip, sd15, embeddings_dir):
    settings = textual_inversion_inputs(steps=2, vectors_per_token=2)
    _embedding, bound, _, file_name = run_node(TRAIN, model=tiny_sdxl_model, clip=sdxl_clip, vae=sd15["vae"], images=_images(2), **settings)
    raw = safetensors.torch.load_file(str(embeddings_dir / file_name))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    init = tokens.token_embedding_rows(sdxl_clip, "cat")
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(raw[key][0], init[key][0]), f"{key} did not train"
    word = settings["trigger_word"]
    name = file_name.removesuffix(".safetensors")
    a = run_node("CLIPTextEncode", clip=bound, text=f"{word} in snow")[0][0]
    b = run_node("CLIPTextEncode", clip=sdxl_clip, text=f"embedding:{name} in snow")[0][0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["pooled_output"], b[1]["pooled_output"])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, images, message",
    [
        ({}, None, "no training images"),
        ({"trigger_word": "my cat"}, "ok", "contains spaces"),
        ({"trigger_word": "cat"}, "ok", r"already is a word.*<cat>"),
        ({"steps": 0}, "ok", "steps must be at least 1"),
        ({"learning_rate": "0"}, "ok", "positive"),
        ({"learning_rate": "-1e-3"}, "ok", "positive"),
        ({"learning_rate": "0.005:100, fast"}, "ok", "not a number"),
        ({"templates": "captions"}, "ok", "needs a caption"),
        ({"templates": "custom", "custom_templates": "a photo"}, "ok", r"no \{\}"),
        ({"resolution": 100}, "ok", "multiple of 64"),
    ],
)
def test_bad_input_is_refused_before_training(sd15, overrides, images, message, monkeypatch):
    started = []
    monkeypatch.setattr(diffusion_model.DiffusionModelForTraining, "__init__", lambda self, *a, **k: started.append(1))
    with pytest.raises(ValueError, match=message):
        run_node(
            TRAIN,
            model=sd15["model"],
            clip=sd15["clip"],
            vae=sd15["vae"],
            images=None if images is None else _images(1),
            **textual_inversion_inputs(**overrides),
        )
    assert not started


def test_existing_file_is_not_overwritten(sd15, embeddings_dir):
    settings = textual_inversion_inputs()
    target = embeddings_dir / (settings["trigger_word"].strip("<>") + ".safetensors")
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        run_node(TRAIN, model=sd15["model"], clip=sd15["clip"], vae=sd15["vae"], images=_images(1), **settings)
    assert target.read_bytes() == b"precious"


def test_resume_file_of_another_family_is_refused(sd15, embeddings_dir):
    name = f"sd2-{uuid.uuid4().hex[:6]}"
    ef.write_embedding(ef.EmbeddingFile({"clip_h": torch.zeros(1, 1024)}, "<x>"), embeddings_dir, name)
    with pytest.raises(ValueError, match=r"SD2\.x.*SD1\.x"):
        run_node(
            TRAIN,
            model=sd15["model"],
            clip=sd15["clip"],
            vae=sd15["vae"],
            images=_images(1),
            **textual_inversion_inputs(resume_from=f"{name}.safetensors"),
        )


def test_live_preview_and_progress_reach_comfyui_hooks(sd15):
    """Previews go through ComfyUI's progress-bar hook, as the server shows them on the node."""
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview, node_id)))
    try:
        run_node(
            TRAIN,
            model=sd15["model"],
            clip=sd15["clip"],
            vae=sd15["vae"],
            images=_images(1),
            unique_id="17",
            **textual_inversion_inputs(steps=2, preview_every=2, preview_prompt="a photo of {} at night"),
        )
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    ours = [s for s in seen if s[3] == "17"]
    assert [s[0] for s in ours][:2] == [1, 2] and all(s[1] == 2 for s in ours)
    previews = [s[2] for s in ours if s[2] is not None]
    assert len(previews) == 1
    kind, image, max_size = previews[0]
    assert kind == "JPEG" and image.size == (64, 64) and max_size == 512


def test_the_file_name_output_keeps_a_subfolder(sd15, embeddings_dir):
    settings = textual_inversion_inputs(steps=1, file_name=f"sub-{uuid.uuid4().hex[:6]}/nested")
    *_, file_name = run_node(TRAIN, model=sd15["model"], clip=sd15["clip"], vae=sd15["vae"], images=_images(1), **settings)
    assert file_name == settings["file_name"] + ".safetensors"
    assert (embeddings_dir / file_name).is_file()


@pytest.mark.parametrize("trainer_kind", ["textual_inversion", "dreambooth_lora"])
def test_a_training_step_copies_no_frozen_unet_weight(sd15, monkeypatch, trainer_kind):
    """Frozen weights are used where they lie, in forward and backward: a step of Textual
    Inversion or LoRA casts no UNet weight into a copy (the model computes in its storage dtype
    here); the text encoder, stored in float16 and computed in float32 as ComfyUI does, is cast."""
    layers = pack_module("nodes.comfy_bridge.layers")
    unet_modules = {id(m) for m in sd15["model"].model.diffusion_model.modules()}
    copied = {"unet": 0, "text encoder": 0}
    original = layers.cast

    def counting(module, dtype, device):
        weight, bias = original(module, dtype, device)
        if weight is not module.weight:
            copied["unet" if id(module) in unet_modules else "text encoder"] += weight.numel() * weight.element_size()
        return weight, bias

    monkeypatch.setattr(layers, "cast", counting)
    images = pack_module("nodes.core.training_images").TrainingImageSet.from_image_batch(_images(2))
    with torch.inference_mode(False), torch.enable_grad():
        if trainer_kind == "textual_inversion":
            settings = ti.TextualInversionSettings(trigger_word="<copies>", init_text="cat", steps=1, resolution=64, save=False)
            init, _ = ti.initial_vectors(settings, sd15["clip"], None)
            trainer = ti.TextualInversionTrainer(sd15["model"], sd15["clip"], sd15["vae"], images, settings, init)
        else:
            db = pack_module("nodes.training.dreambooth")
            settings = db.DreamBoothSettings(mode="lora", steps=1, resolution=64, save=False, prior_preservation=False, pivotal_tuning=True)
            plan = db.validate(settings, images, sd15["model"], sd15["clip"], None)
            trainer = db.DreamBoothTrainer(sd15["model"], sd15["clip"], sd15["vae"], images, settings, plan)
        copied.update(unet=0, **{"text encoder": 0})
        trainer.step(1)
    print(
        f"{trainer_kind}: a step copies {copied['unet'] / 2**20:.1f} MB of UNet and {copied['text encoder'] / 2**20:.1f} MB of text-encoder weights"
    )
    assert copied["unet"] == 0
