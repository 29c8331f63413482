"""DreamBooth on the tiny SD1.5 model, through ComfyUI's own loaders, samplers and nodes.

Training runs are few and short (64x64 images, 2-4 steps); the runs several tests inspect
are module fixtures.
"""

from __future__ import annotations

import hashlib
import importlib
import uuid
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.utils
import folder_paths
import nodes
import pytest
import safetensors
import safetensors.torch
import torch
from harness import cancel_at_step, dreambooth_inputs, pack_module, run_node

_ROOT = pack_module().__name__
db = importlib.import_module(_ROOT + ".nodes.training.dreambooth")
db_node = importlib.import_module(_ROOT + ".nodes.dreambooth_node")
common = pack_module("nodes.training.common")
identifiers = pack_module("nodes.core.identifiers")
tokens = pack_module("nodes.comfy_bridge.tokens")
sampling = pack_module("nodes.comfy_bridge.sampling")
saving = pack_module("nodes.comfy_bridge.saving")
diffusion_model = pack_module("nodes.comfy_bridge.diffusion_model")
text_encoders = pack_module("nodes.comfy_bridge.text_encoders")
adapters = pack_module("nodes.core.adapters")
training_layers = pack_module("nodes.core.training_layers")
precision = pack_module("nodes.core.precision")
ef = pack_module("nodes.core.embedding_file")
training_math = pack_module("nodes.core.training_math")
optimizers = pack_module("nodes.core.optimizers")
devices = pack_module("nodes.comfy_bridge.devices")
TrainingImageSet = pack_module("nodes.core.training_images").TrainingImageSet
DREAMBOOTH = pack_module("nodes.graph_types").DREAMBOOTH_FINETUNE


def run_dreambooth(**inputs):
    """The node as ComfyUI's executor calls it (registered type if the pack registers it)."""
    if DREAMBOOTH in nodes.NODE_CLASS_MAPPINGS:
        return run_node(DREAMBOOTH, **inputs)
    with torch.inference_mode():
        return db_node.DreamBoothFinetune().train(**inputs)


def _images(count: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 1, 1, 3, generator=g)
    return (base + 0.2 * torch.rand(count, size, size, 3, generator=g)).clamp(0, 1)


def _inputs(sd15, **overrides):
    models = {"model": sd15["model"], "clip": sd15["clip"], "vae": sd15["vae"], "images": _images()}
    models.update(overrides)
    return dreambooth_inputs(**models)


def _settings(**overrides):
    values = {
        "resolution": 64,
        "steps": 2,
        "num_class_images": 2,
        "class_steps": 2,
        "class_cfg": 5.0,
        "class_sampler": "euler",
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "prior_preservation": False,
        "save": False,
    }
    values.update(overrides)
    return db.DreamBoothSettings(**values)


def _state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load(*patchers):
    comfy.model_management.load_models_gpu(list(patchers), force_full_load=True)


def _unet_output(model, seed: int = 7) -> torch.Tensor:
    """apply_model of a MODEL (its patches applied, as sampling would) on a fixed input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    sigma = torch.tensor([14.6, 0.8])
    _load(model)
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=context).float().clone()


def _encode(clip, text: str) -> torch.Tensor:
    return run_node("CLIPTextEncode", clip=clip, text=text)[0][0][0]


def _eval_loss(model, vae, cond: torch.Tensor) -> float:
    """Mean loss on the instance images with fixed noise and timesteps (not the training draws)."""
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(_images()[..., :3])).float()
    g = torch.Generator().manual_seed(123)
    timesteps = torch.tensor([100, 300, 500, 700, 900])
    latents = latents.repeat_interleave(len(timesteps), 0)
    timesteps = timesteps.repeat(3)
    noise = torch.randn(latents.shape, generator=g)
    _load(model)
    with torch.inference_mode():
        ms = model.get_model_object("model_sampling")
        sigma = ms.sigma(timesteps)
        x = ms.noise_scaling(sigma, noise, latents)
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond.expand(latents.shape[0], -1, -1)).float()
        return float(training_math.prediction_loss(denoised, latents, sigma, "eps").mean())


class _CountSampling:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = comfy.sample.sample

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(comfy.sample, "sample", counting)


# --------------------------------------------------------------------------- the node's face


def test_every_input_has_a_tooltip():
    spec = db_node.DreamBoothFinetune.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, options) in spec[section].items():
            assert options.get("tooltip"), f"{name} has no tooltip"
    assert len(db_node.DreamBoothFinetune.OUTPUT_TOOLTIPS) == len(db_node.DreamBoothFinetune.RETURN_TYPES)
    assert db_node.DreamBoothFinetune.CATEGORY == pack_module("nodes.graph_types").CATEGORY


# --------------------------------------------------------------------------- identifiers


def test_identifier_is_the_words_the_class_prompt_lacks():
    assert identifiers.derive_identifier("a photo of sks dog", "a photo of dog") == "sks"
    assert identifiers.derive_identifier("a photo of ohwx zxq dog", "a photo of dog") == "ohwx zxq"
    assert identifiers.derive_identifier("a photo of <my-dog> dog", "a photo of dog") == "<my-dog>"
    assert identifiers.derive_identifier("a photo of sks dog on grass", "a photo of dog", "sks") == "sks"
    assert identifiers.class_word("a photo of sks dog", "a photo of dog", "sks") == "dog"
    with pytest.raises(ValueError, match="several words"):
        identifiers.derive_identifier("a sks photo of dog xyz", "a photo of dog")


def test_rare_token_suggestions_follow_the_paper(sd15):
    vocab = tokens.first_vocabulary(sd15["clip"])
    size = max(vocab.values()) + 1
    one = identifiers.suggest_identifier(vocab, seed=3, count=1)
    assert one == identifiers.suggest_identifier(vocab, seed=3, count=1), "deterministic by seed"
    assert one != identifiers.suggest_identifier(vocab, seed=4, count=1)
    three = identifiers.suggest_identifier(vocab, seed=3, count=3).split()
    assert len(three) == 3
    for word in three:
        assert word.isascii() and word.isalpha() and 2 <= len(word) <= 3
        assert vocab[word + "</w>"] >= 0.8 * size, "drawn from the rarest part of the vocabulary"
        assert tokens.first_token_ids(sd15["clip"], word) == [vocab[word + "</w>"]], "one token"
    with pytest.raises(ValueError, match="1-3"):
        identifiers.suggest_identifier(vocab, count=4)


def test_weak_identifiers_are_warned_about(sd15):
    common = db.identifier_notes("cat", sd15["clip"], seed=0)
    assert any("common word" in n for n in common)
    long = db.identifier_notes("xqzvkjwpl", sd15["clip"], seed=0)
    assert any("splits into" in n for n in long)
    rare = db.identifier_notes("sks", sd15["clip"], seed=0)
    assert not any("common word" in n or "splits into" in n for n in rare)
    assert any("rare-token identifiers you could use" in n for n in rare)


# --------------------------------------------------------------------------- prior preservation


def test_class_images_are_the_frozen_models_samples_and_are_cached(sd15, monkeypatch):
    model, clip = sd15["model"], sd15["clip"]
    settings = _settings(prior_preservation=True, seed=911, class_sampler="euler_ancestral", num_class_images=2, class_steps=2)
    counter = _CountSampling(monkeypatch)
    latents, cached = db.class_latents(model, clip, settings)
    assert not cached and counter.calls == 1
    (positive,) = run_node("CLIPTextEncode", clip=clip, text="a photo of dog")
    (negative,) = run_node("CLIPTextEncode", clip=clip, text="")
    (empty,) = run_node("EmptyLatentImage", width=64, height=64, batch_size=2)
    (sampled,) = run_node(
        "KSampler",
        model=model,
        seed=911,
        steps=2,
        cfg=5.0,
        sampler_name="euler_ancestral",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=empty,
        denoise=1.0,
    )
    torch.testing.assert_close(latents, sampled["samples"].float(), rtol=0, atol=1e-6)

    counter.calls = 1  # KSampler above sampled through the same function
    again, cached = db.class_latents(model, clip, settings)
    assert cached and counter.calls == 1, "the second run must reuse the cache"
    assert torch.equal(again, latents)
    key = db.class_cache_key(model, settings)[0]
    for change in ({"class_cfg": 6.0}, {"class_prompt": "a photo of cat"}, {"seed": 910}, {"num_class_images": 3}, {"resolution": 128}):
        other = _settings(
            **{
                "prior_preservation": True,
                "seed": 911,
                "class_sampler": "euler_ancestral",
                "num_class_images": 2,
                "class_steps": 2,
                **change,
            }
        )
        assert db.class_cache_key(model, other)[0] != key, change


def test_prior_term_pairs_class_latents_with_the_class_prompt(sd15):
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    settings = _settings(prior_preservation=True, seed=911, class_sampler="euler_ancestral", prior_loss_weight=2.5)
    raw, _ = db.class_latents(model, clip, settings)
    plan = db.validate(settings, TrainingImageSet.from_image_batch(_images()), model, clip, None)
    with torch.inference_mode(False), torch.enable_grad():
        trainer = db.DreamBoothTrainer(model, clip, vae, TrainingImageSet.from_image_batch(_images()), settings, plan, class_raw=raw)
        pool = {tuple(s.latent.flatten()[:4].tolist()) for s in trainer.klass.buckets[0]}
        expected = model.model.process_latent_in(raw)
        assert pool == {tuple(x.flatten()[:4].tolist()) for x in expected}, "the class pool is the frozen model's samples"
        instance, klass = trainer.instance.draw(), trainer.klass.draw()
        with torch.no_grad():
            _instance_loss, prior_loss = trainer.losses(instance, klass)
            class_cond = text_encoders.encode_prompt(clip, "a photo of dog")
            wrong_cond = trainer.frozen_text["a photo of sks dog"]
            batch = (klass.latents, klass.noise, klass.timesteps)
            assert float(prior_loss) == pytest.approx(float(common.diffusion_loss(trainer.unet, *batch, *class_cond)), rel=1e-6)
            assert float(prior_loss) != pytest.approx(float(common.diffusion_loss(trainer.unet, *batch, *wrong_cond)), rel=1e-6)
        losses = trainer.step(1)
    assert losses["loss"] == pytest.approx(losses["instance"] + 2.5 * losses["prior"], rel=1e-9)


@pytest.fixture(scope="module")
def lambda_runs(sd15):
    """LoRA runs with the same seed: prior with λ = 0, and no prior."""
    images = TrainingImageSet.from_image_batch(_images())
    common = {
        "seed": 911,
        "class_sampler": "euler_ancestral",
        "steps": 2,
        "learning_rate": "1e-3",
        "prior_preservation": True,
        "batch_size": 1,
        "gradient_accumulation": 2,
        "flip": True,
    }
    with torch.inference_mode():
        zero = db.train_dreambooth(sd15["model"], sd15["clip"], sd15["vae"], images, _settings(prior_loss_weight=0.0, **common))
        off = db.train_dreambooth(sd15["model"], sd15["clip"], sd15["vae"], images, _settings(**{**common, "prior_preservation": False}))
    return zero, off


def test_lambda_zero_trains_exactly_as_without_prior(lambda_runs):
    zero, off = lambda_runs
    assert zero.class_images in ("generated", "cached") and off.class_images == "none"
    assert zero.lora.keys() == off.lora.keys()
    for key in off.lora:
        assert torch.equal(zero.lora[key], off.lora[key]), key
    assert zero.losses.raw["instance"] == off.losses.raw["instance"]
    assert len(zero.losses.raw["prior"]) == 2 and "prior" not in off.losses.raw


# --------------------------------------------------------------------------- LoRA mode


@pytest.fixture(scope="module")
def lora_run(sd15):
    """LoRA with the text encoder and pivotal tuning, saved; input hashes taken before."""
    model, clip = sd15["model"], sd15["clip"]
    _load(model, clip.patcher)
    before = {
        "unet": _state_hash(model.model),
        "clip": _state_hash(clip.cond_stage_model),
        "out": _unet_output(model),
        "cond": _encode(clip, "a photo of sks dog"),
    }
    inputs = _inputs(
        sd15,
        steps=2,
        learning_rate="5e-3",
        text_encoder_learning_rate="1e-4",
        train_text_encoder=True,
        pivotal_tuning=True,
        batch_size=2,
        seed=21,
    )
    outputs = run_dreambooth(**inputs)
    return inputs, outputs, before


def test_lora_file_reloads_through_lora_loader(sd15, lora_run):
    inputs, (model, clip, file_names, curve, status), _ = lora_run
    name = inputs["file_name"]
    assert file_names.splitlines() == [f"loras/{name}.safetensors", f"embeddings/{name}.safetensors"]
    path = Path(folder_paths.get_full_path("loras", f"{name}.safetensors"))
    tensors = safetensors.torch.load_file(str(path))
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["identifier"] == "sks" and metadata["steps"] == "2"

    loaded_model, loaded_clip = run_node(
        "LoraLoader", model=sd15["model"], clip=sd15["clip"], lora_name=f"{name}.safetensors", strength_model=1.0, strength_clip=1.0
    )
    assert torch.equal(_unet_output(loaded_model), _unet_output(model))
    assert not torch.equal(_unet_output(model), _unet_output(sd15["model"])), "the LoRA changes the model"
    # The text-encoder half of the file: same conditioning (the output CLIP also binds the word).
    assert torch.equal(_encode(loaded_clip, "a photo of a dog"), _encode(clip, "a photo of a dog"))
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert "identifier 'sks'" in status and "saved lora" in status


def test_inputs_are_unchanged_after_training(sd15, lora_run):
    _, (model, clip, *_), before = lora_run
    _unet_output(model)  # the tuned clone was the last one loaded: its patches are in the shared weights
    _encode(clip, "a photo of sks dog")
    _load(sd15["model"], sd15["clip"].patcher)  # as ComfyUI does before the input is used again
    assert _state_hash(sd15["model"].model) == before["unet"]
    assert _state_hash(sd15["clip"].cond_stage_model) == before["clip"]
    assert torch.equal(_unet_output(sd15["model"]), before["out"])
    assert torch.equal(_encode(sd15["clip"], "a photo of sks dog"), before["cond"])
    # Frozen weights are cut from the graph: no gradient was computed for, or left on, them.
    for module in (sd15["model"].model, sd15["clip"].cond_stage_model):
        assert [n for n, p in module.named_parameters() if p.grad is not None] == []


def test_text_encoder_training_changes_the_output_clip_only(sd15, lora_run):
    _, (_, clip, *_), before = lora_run
    tuned = _encode(clip, "a photo of a dog")
    assert not torch.equal(tuned, _encode(sd15["clip"], "a photo of a dog"))
    assert torch.equal(_encode(sd15["clip"], "a photo of sks dog"), before["cond"])


def test_pivotal_tuning_writes_an_embedding_for_embedding_syntax(sd15, lora_run, embeddings_dir):
    inputs, (_, clip, *_), _ = lora_run
    name = inputs["file_name"]
    embedding = ef.read_embedding(embeddings_dir / f"{name}.safetensors")
    assert embedding.num_vectors == 1 and embedding.name == "sks"
    init = tokens.token_embedding_rows(sd15["clip"], "dog")["clip_l"]
    assert not torch.equal(embedding.vectors["clip_l"][0], init[0]), "the vector trained from the class word"
    # Through the tuned CLIP, embedding:NAME gives what the bound identifier gives.
    via_file = _encode(clip, f"a photo of embedding:{name} dog")
    via_word = _encode(clip, "a photo of sks dog")
    assert torch.equal(via_file, via_word)


# --------------------------------------------------------------------------- full mode


@pytest.fixture(scope="module")
def full_run(sd15):
    """Full fine-tuning with the text encoder; saved at step 1 and again at the end (step 2)."""
    model, clip = sd15["model"], sd15["clip"]
    _load(model, clip.patcher)
    before = {"unet": _state_hash(model.model), "out": _unet_output(model)}
    inputs = _inputs(
        sd15,
        mode="full",
        steps=2,
        save_every=1,
        learning_rate="2e-4",
        text_encoder_learning_rate="1e-5",
        train_text_encoder=True,
        batch_size=2,
        seed=22,
    )
    outputs = run_dreambooth(**inputs)
    yield inputs, outputs, before
    (Path(folder_paths.get_folder_paths("checkpoints")[0]) / f"{inputs['file_name']}.safetensors").unlink(missing_ok=True)


def test_full_checkpoint_reloads_through_checkpoint_loader(sd15, full_run):
    inputs, (model, clip, file_names, _, _), _ = full_run
    name = f"{inputs['file_name']}.safetensors"
    assert file_names == f"checkpoints/{name}"
    with safetensors.safe_open(folder_paths.get_full_path("checkpoints", name), framework="pt") as handle:
        assert handle.metadata()["steps"] == "2", "the end-of-training save replaced the one from step 1"
    loaded_model, loaded_clip, _ = run_node("CheckpointLoaderSimple", ckpt_name=name)
    ours, theirs = _unet_output(model), _unet_output(loaded_model)
    # The file stores the weights in the model's storage dtype: equal up to that rounding. The
    # save at step 1 loaded the tuned model in between: training went on from the right weights.
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)
    assert not torch.equal(ours, _unet_output(sd15["model"]))
    torch.testing.assert_close(_encode(loaded_clip, "a photo of sks dog"), _encode(clip, "a photo of sks dog"), rtol=1e-3, atol=1e-3)
    assert not torch.equal(_encode(clip, "a photo of sks dog"), _encode(sd15["clip"], "a photo of sks dog"))


def test_full_finetune_leaves_the_input_model_alone(sd15, full_run):
    _, (model, *_), before = full_run
    _unet_output(model)
    _load(sd15["model"])
    assert _state_hash(sd15["model"].model) == before["unet"]
    assert torch.equal(_unet_output(sd15["model"]), before["out"])
    for module in sd15["model"].model.diffusion_model.modules():
        assert "forward" not in vars(module), "no module of the shared model was patched"


@pytest.mark.parametrize("mode, rate", [("lora", "3e-3"), ("full", "1e-4")])
def test_training_reduces_the_instance_loss_on_a_fixed_batch(sd15, mode, rate):
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    cond = _encode(clip, "a photo of sks dog")
    before = _eval_loss(model, vae, cond)
    settings = _settings(mode=mode, learning_rate=rate, steps=4, batch_size=2, seed=31, gradient_checkpointing=mode == "lora")
    with torch.inference_mode():
        result = db.train_dreambooth(model, clip, vae, TrainingImageSet.from_image_batch(_images()), settings)
    after = _eval_loss(result.model, vae, cond)
    print(f"{mode}: fixed-batch instance loss {before:.5f} -> {after:.5f}")
    assert after < 0.97 * before


def test_saving_midway_does_not_change_full_training(sd15, monkeypatch):
    """A checkpoint save loads the tuned model into the shared weights; training must go on as if it had not."""
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    images = TrainingImageSet.from_image_batch(_images())
    saves = []

    def load_instead_of_writing(out_model, out_clip, vae, name, *, overwrite, metadata):
        comfy.model_management.load_models_gpu([out_model, out_clip.patcher], force_patch_weights=True)
        saves.append(metadata["steps"])
        return Path(name)

    monkeypatch.setattr(saving, "save_checkpoint_file", load_instead_of_writing)
    common = {"mode": "full", "steps": 2, "learning_rate": "1e-4", "seed": 41}
    with torch.inference_mode():
        saved = db.train_dreambooth(
            model, clip, vae, images, _settings(save=True, save_every=1, file_name=f"db-{uuid.uuid4().hex[:8]}", **common)
        )
        plain = db.train_dreambooth(model, clip, vae, images, _settings(**common))
    assert saves == ["1", "2"]
    patches = {k: v[-1][1][1][0] for k, v in saved.model.patches.items()}
    expected = {k: v[-1][1][1][0] for k, v in plain.model.patches.items()}
    assert patches.keys() == expected.keys() and patches
    for key in expected:
        assert torch.equal(patches[key], expected[key]), key


# --------------------------------------------------------------------------- memory-lean full mode


def _trainer(sd15, **overrides):
    images = TrainingImageSet.from_image_batch(_images())
    settings = _settings(mode="full", learning_rate="1e-4", **overrides)
    plan = db.validate(settings, images, sd15["model"], sd15["clip"], None)
    class_raw = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) if settings.prior_preservation else None
    return db.DreamBoothTrainer(sd15["model"], sd15["clip"], sd15["vae"], images, settings, plan, class_raw=class_raw)


def test_full_bf16_trains_a_bfloat16_copy_whose_updates_land(sd15):
    with torch.inference_mode(False), torch.enable_grad():
        trainer = _trainer(sd15, steps=2, seed=5)
        assert trainer.bf16 and trainer.fused and [n for n in trainer.notes if "beyond the frozen model" not in n] == [], "no fallback note"
        layers = [m for _, m in training_layers.training_layers(trainer.unet.view)]
        assert layers and all(m.own and m.weight.dtype == torch.bfloat16 for m in layers)
        before = {n: p.detach().clone() for n, p in trainer.unet.view.named_parameters()}
        losses = [trainer.step(1)["loss"], trainer.step(2)["loss"]]
        changed = [n for n, p in trainer.unet.view.named_parameters() if not torch.equal(p.detach(), before[n])]
        states = trainer.optimizer.state
        assert all(p.grad is None for p in trainer.params), "the fused step freed every gradient"
    assert all(torch.isfinite(torch.tensor(losses)))
    # lr 1e-4 is below bfloat16's resolution for most weights: without stochastic rounding few would move.
    assert len(changed) > 0.9 * len(before), f"{len(changed)} of {len(before)} weights changed"
    assert {s["exp_avg"].dtype for s in states.values()} == {torch.bfloat16}
    assert {s["step"] for s in states.values()} == {2}, "every weight updated once per step"


def test_fused_step_equals_the_usual_step_in_float32(sd15):
    """fp32, no clipping: updating inside backward gives the weights a separate step gives."""
    results = []
    for fused in (False, True):
        with torch.inference_mode(False), torch.enable_grad():
            trainer = _trainer(
                sd15, steps=2, seed=6, full_bf16=False, fused_backward=fused, max_grad_norm=0.0, prior_preservation=True, num_class_images=2
            )
            assert trainer.fused == fused and not trainer.bf16
            losses = [trainer.step(1), trainer.step(2)]
            results.append((losses, {n: p.detach().clone() for n, p in trainer.unet.view.named_parameters()}))
    (plain_losses, plain), (fused_losses, fused_weights) = results
    assert plain_losses[0] == fused_losses[0], "the first step's losses come before any update"
    assert fused_losses[1]["prior"] == pytest.approx(plain_losses[1]["prior"], rel=1e-5)
    moved = [n for n in plain if not torch.equal(plain[n], _trainer_start(sd15, n))]
    assert moved
    for name in plain:
        torch.testing.assert_close(fused_weights[name], plain[name], rtol=1e-5, atol=1e-6)


def _trainer_start(sd15, name: str) -> torch.Tensor:
    return sd15["model"].model.diffusion_model.get_parameter(name).detach().to(torch.float32)


@pytest.mark.parametrize(
    "overrides, note",
    [
        ({"gradient_accumulation": 2}, "fused_backward needs gradient accumulation 1"),
        ({"optimizer": "AdamW8bit"}, "work with the AdamW optimizer"),
    ],
)
def test_lean_settings_that_cannot_apply_fall_back_with_a_note(overrides, note):
    settings = _settings(mode="full", **overrides)
    bf16_copy = precision.Precision(torch.float32, loss_scaling=False, copy_dtype=torch.bfloat16)
    fp16_compute = precision.Precision(torch.float16, loss_scaling=True, copy_dtype=torch.float32)
    _bf16, fused, notes = db.memory_plan(settings, bf16_copy)
    assert not fused and any(note in n for n in notes)
    assert db.memory_plan(_settings(mode="lora"), bf16_copy) == (False, False, [])
    assert db.memory_plan(_settings(mode="full", full_bf16=False), fp16_compute) == (
        False,
        False,
        ["fused_backward on float16 compute needs full_bf16 (the fused step has no loss scaling): whole-model gradients are kept"],
    )


# --------------------------------------------------------------------------- live preview


class _RecordPreviews:
    """Wraps comfy_adapter.render_preview: records (model, clip, prompt, image) per call.

    It samples 2 steps instead of 20: the same sampler, conditioning and VAE decode, at a
    tenth of the CPU time.
    """

    def __init__(self, monkeypatch, steps: int = 2):
        self.calls = []
        self.steps = steps
        self.original = original = sampling.render_preview

        def recording(model, clip, vae, prompt, *args, **kwargs):
            image = original(model, clip, vae, prompt, *args, **{**kwargs, "steps": steps})
            self.calls.append((model, clip, prompt, image))
            return image

        monkeypatch.setattr(sampling, "render_preview", recording)

    def render(self, model, clip, vae, prompt: str, seed: int) -> torch.Tensor:
        """A render as the previews are made, as int16 pixels."""
        with torch.inference_mode():
            return _pixels(self.original(model, clip, vae, prompt, seed, 64, 64, steps=self.steps))


def _pixels(image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).to(torch.int16)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_previews_sample_the_model_in_training_without_changing_the_training(sd15, mode, monkeypatch):
    """A preview every step samples the training's own clone (and training CLIP), and the run
    trains exactly as without previews: same losses, same result, bit for bit."""
    model, clip, vae = sd15["model"], sd15["clip"], sd15["vae"]
    images = TrainingImageSet.from_image_batch(_images())
    # LoRA: text-encoder LoRA and pivotal tuning too (the preview CLIP is the training one);
    # full: the forward is routed to the trained copy. Class images given: no class sampling.
    common = {
        "mode": mode,
        "steps": 3,
        "seed": 51,
        "prior_preservation": True,
        "learning_rate": "2e-3" if mode == "lora" else "1e-4",
        "train_text_encoder": mode == "lora",
        "pivotal_tuning": mode == "lora",
    }
    class_images = _images(2, seed=9)
    with torch.inference_mode():
        plain = db.train_dreambooth(model, clip, vae, images, _settings(**common), class_images=class_images)
    previews = _RecordPreviews(monkeypatch)
    with torch.inference_mode():
        previewed = db.train_dreambooth(model, clip, vae, images, _settings(preview_every=1, **common), class_images=class_images)

    assert len(previews.calls) == 3
    for preview_model, preview_clip, prompt, image in previews.calls:
        assert prompt == "a photo of sks dog", "empty preview prompt: the instance prompt"
        assert preview_model is not model and preview_model.is_clone(model), "the training clone, not the input MODEL"
        assert (preview_clip is not clip) == (mode == "lora"), "the training CLIP exactly when the text side trains"
        assert image.size == (64, 64)
    assert previewed.losses.raw == plain.losses.raw
    assert set(previewed.losses.raw) == {"loss", "instance", "prior"} and len(plain.losses.raw["loss"]) == 3
    if mode == "lora":
        assert previewed.lora.keys() == plain.lora.keys()
        for key in plain.lora:
            assert torch.equal(previewed.lora[key], plain.lora[key]), key
        for key in plain.embedding.vectors:
            assert torch.equal(previewed.embedding.vectors[key], plain.embedding.vectors[key]), key
    else:
        patches = {k: v[-1][1][1][0] for k, v in previewed.model.patches.items()}
        expected = {k: v[-1][1][1][0] for k, v in plain.model.patches.items()}
        assert patches.keys() == expected.keys() and patches
        for key in expected:
            assert torch.equal(patches[key], expected[key]), key
    # The last preview is what the output MODEL and CLIP draw (up to the rounding of the tuned
    # weights to their storage dtype), and not what the untrained model draws.
    last = _pixels(previews.calls[-1][3])
    tuned = previews.render(previewed.model, previewed.clip, vae, "a photo of sks dog", 51)
    untrained = previews.render(model, clip, vae, "a photo of sks dog", 51)
    assert (last - tuned).abs().max() <= 2
    assert (last - untrained).abs().float().mean() > 5


def test_preview_reaches_comfyuis_progress_hook(sd15, monkeypatch):
    """Previews go through ComfyUI's progress-bar hook, as the server shows them on the node;
    {} in the preview prompt is the identifier."""
    seen = []
    previews = _RecordPreviews(monkeypatch)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview, node_id)))
    try:
        run_dreambooth(
            **_inputs(
                sd15,
                steps=3,
                prior_preservation=False,
                unique_id="23",
                preview_every=2,
                preview_prompt="a watercolor painting of {} dog",
                save_every=0,
            )
        )
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    ours = [s for s in seen if s[3] == "23"]
    assert [s[0] for s in ours][:3] == [1, 2, 3] and all(s[1] == 3 for s in ours)
    shown = [(s[0], s[2]) for s in ours if s[2] is not None]
    assert [step for step, _ in shown] == [2, 3], "every 2 steps, and at the end"
    for _, (kind, image, max_size) in shown:
        assert kind == "JPEG" and image.size == (64, 64) and max_size == 512
    assert [prompt for _, _, prompt, _ in previews.calls] == ["a watercolor painting of sks dog"] * 2


# --------------------------------------------------------------------------- SDXL


def test_sdxl_lora_with_pivotal_tuning(tiny_sdxl_model, sdxl_clip, sd15, embeddings_dir):
    import tiny_models

    inputs = _inputs(sd15, model=tiny_sdxl_model, clip=sdxl_clip, steps=1, pivotal_tuning=True, seed=51, learning_rate="1e-3")
    model, _clip, _file_names, _, _ = run_dreambooth(**inputs)
    name = inputs["file_name"]
    raw = safetensors.torch.load_file(str(embeddings_dir / f"{name}.safetensors"))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}

    loaded, _ = run_node(
        "LoraLoader", model=tiny_sdxl_model, clip=sdxl_clip, lora_name=f"{name}.safetensors", strength_model=1.0, strength_clip=1.0
    )
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)

    def output(patcher):
        _load(patcher)
        with torch.inference_mode():
            y = tiny_models.sdxl_adm(patcher, pooled, 64, 64)
            return patcher.model.apply_model(x, torch.tensor([3.0]), c_crossattn=context, y=y).clone()

    assert torch.equal(output(loaded), output(model))
    assert not torch.equal(output(model), output(tiny_sdxl_model))
    # Text-encoder LoRA names for SDXL are kohya's te1 (CLIP-L) / te2 (CLIP-G), and load back.
    names = saving.clip_lora_names(sdxl_clip, text_encoders.clip_lora_weights(sdxl_clip))
    assert {n.split("_text_model")[0] for n in names.values()} == {"lora_te1", "lora_te2"}
    assert all(n.startswith("lora_te1_") == k.startswith("clip_l.") for k, n in names.items())


# --------------------------------------------------------------------------- gradients


def _directional_check(loss_fn, params, h: float, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in directions))
    directions = [d / norm for d in directions]
    with torch.inference_mode(False), torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params)
        analytic = float(sum((gr * d).sum() for gr, d in zip(grads, directions, strict=False)))
        with torch.no_grad():
            for p, d in zip(params, directions, strict=False):
                p.add_(h * d)
            up = float(loss_fn())
            for p, d in zip(params, directions, strict=False):
                p.sub_(2 * h * d)
            down = float(loss_fn())
            for p, d in zip(params, directions, strict=False):
                p.add_(h * d)
    return analytic, (up - down) / (2 * h)


def test_text_encoder_weight_gradients_match_finite_differences(sd15):
    clip = sd15["clip"]
    layer = "clip_l.transformer.text_model.encoder.layers.{}.{}"
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode(False):
        pair = adapters.LoraPair((768, 768), 2, 2.0, generator=g)
        with torch.no_grad():
            pair.up.normal_(0, 0.05, generator=g)
        # A LoRA on one layer and full tuning (weights of the view's own) everywhere.
        encoder = text_encoders.TrainingTextEncoder(
            clip, adapters={layer.format(3, "self_attn.q_proj") + ".weight": pair}, own_dtype=torch.float32
        )
        own = encoder.view.get_submodule(layer.format(7, "mlp.fc1")).weight
        with torch.no_grad():
            cond, _ = encoder.encode(["a photo of sks dog"])
            target = cond + torch.randn(cond.shape, generator=g) * cond.std()

    def loss():
        return (encoder.encode(["a photo of sks dog"])[0] - target).pow(2).mean()

    analytic, numeric = _directional_check(loss, [pair.down, pair.up, own], h=0.05)
    assert abs(numeric) > 1e-7
    assert analytic == pytest.approx(numeric, rel=0.02)


def _unet_case(model, mode: str, checkpointing: bool):
    g = torch.Generator().manual_seed(9)
    pairs = {}
    if mode == "lora":
        for key, shape in diffusion_model.unet_lora_weights(model, "attention+mlp").items():
            pairs[key] = adapters.LoraPair(shape, 2, 2.0, generator=g)
            with torch.no_grad():
                pairs[key].up.normal_(0, 0.02, generator=g)
    unet = diffusion_model.DiffusionModelForTraining(
        model, torch.float32, adapters=pairs, own_dtype=torch.float32 if mode == "full" else None, gradient_checkpointing=checkpointing
    )
    unet.load()
    params = [p for pair in pairs.values() for p in pair.parameters()] + unet.trained_parameters()
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    loss = common.diffusion_loss(unet, latents, noise, torch.tensor([50, 700]), context, None)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), grads, unet.route


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(sd15, mode):
    model = sd15["model"]
    _load(model)
    before = _state_hash(model.model)
    with torch.inference_mode(False), torch.enable_grad():
        plain_loss, plain, _ = _unet_case(model, mode, checkpointing=False)
        ckpt_loss, ckpt, route = _unet_case(model, mode, checkpointing=True)
    assert route.calls >= 1, "the forward ran through the checkpointed view"
    assert ckpt_loss == plain_loss
    for a, b in zip(plain, ckpt, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(a.abs().max()) > 0 for a in plain)
    _load(model)
    assert _state_hash(model.model) == before
    for module in model.model.diffusion_model.modules():
        assert "forward" not in vars(module)


# --------------------------------------------------------------------------- cancel and bad input


def test_cancel_keeps_the_last_save(sd15, monkeypatch):
    # With class images given: they are encoded, none is sampled.
    inputs = _inputs(sd15, steps=4, save_every=2, seed=23, prior_preservation=True, class_images=_images(2, seed=9))
    counter = _CountSampling(monkeypatch)
    path = Path(folder_paths.get_folder_paths("loras")[0]) / f"{inputs['file_name']}.safetensors"
    with cancel_at_step(3):
        run_dreambooth(**inputs)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["steps"] == "2", "the save from step 2 stays; no save on cancel"
    assert counter.calls == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"images": None}, "no instance images"),
        ({"instance_prompt": "  "}, "instance prompt is empty"),
        ({"class_prompt": ""}, "class prompt is empty"),
        ({"instance_prompt": "a photo of dog"}, "has no identifier"),
        ({"identifier": "zwx"}, "not in the instance prompt"),
        ({"identifier": "sks", "class_prompt": "a photo of sks dog"}, "contains the identifier"),
        ({"prior_loss_weight": -0.5}, "λ must be 0 or more"),
        ({"lora_rank": 0}, "rank must be at least 1"),
        ({"learning_rate": "fast"}, "not a number"),
        ({"resolution": 100}, "multiple of 64"),
        ({"preview_every": -1}, "preview every must be 0"),
        ({"file_name": "../escape"}, "leave the models folder"),
    ],
)
def test_bad_input_is_refused_before_any_work(sd15, overrides, message, monkeypatch):
    started = []
    monkeypatch.setattr(diffusion_model.DiffusionModelForTraining, "__init__", lambda self, *a, **k: started.append("train"))
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: started.append("sample"))
    with pytest.raises(ValueError, match=message):
        run_dreambooth(**_inputs(sd15, prior_preservation=True, **overrides))
    assert not started


def test_eight_bit_adam_without_bitsandbytes_is_refused(sd15, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ValueError, match="bitsandbytes"):
        run_dreambooth(**_inputs(sd15, optimizer="AdamW8bit"))


def test_existing_file_is_not_overwritten(sd15, monkeypatch):
    inputs = _inputs(sd15)
    target = Path(folder_paths.get_folder_paths("loras")[0]) / f"{inputs['file_name']}.safetensors"
    target.write_bytes(b"precious")
    started = []
    monkeypatch.setattr(diffusion_model.DiffusionModelForTraining, "__init__", lambda self, *a, **k: started.append(1))
    with pytest.raises(FileExistsError, match="overwrite"):
        run_dreambooth(**inputs)
    assert target.read_bytes() == b"precious" and not started


# --------------------------------------------------------------------------- resuming


def _metadata(kind: str, name: str) -> dict:
    with safetensors.safe_open(folder_paths.get_full_path(kind, name), framework="pt") as handle:
        return handle.metadata()


def test_a_lora_run_resumes_from_its_file(sd15):
    first = _inputs(sd15, steps=2, lora_rank=4, lora_alpha=4.0, learning_rate="5e-3", seed=61)
    run_dreambooth(**first)
    name = f"{first['file_name']}.safetensors"
    saved = safetensors.torch.load_file(folder_paths.get_full_path("loras", name))
    # The file sets the rank (the settings ask for 2); the step count goes on from its metadata.
    resumed = _inputs(
        sd15,
        steps=1,
        lora_rank=2,
        lora_alpha=2.0,
        learning_rate="1e-12",
        seed=62,
        file_name=first["file_name"],
        overwrite=True,
        resume_from=f"loras/{name}",
    )
    _, _, _, _, status = run_dreambooth(**resumed)
    after = safetensors.torch.load_file(folder_paths.get_full_path("loras", name))
    assert _metadata("loras", name)["steps"] == "3" and _metadata("loras", name)["ss_network_dim"] == "4"
    assert f"resumed from loras/{name} at step 2" in status
    assert after.keys() == saved.keys()
    for key in saved:  # a step at lr 1e-12 from the saved factors leaves them where they were
        torch.testing.assert_close(after[key], saved[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_full_run_resumes_from_its_checkpoint(sd15):
    first = _inputs(sd15, mode="full", steps=1, learning_rate="2e-4", seed=63)
    tuned, *_ = run_dreambooth(**first)
    name = f"{first['file_name']}.safetensors"
    resumed = _inputs(
        sd15,
        mode="full",
        steps=1,
        learning_rate="1e-12",
        seed=64,
        file_name=first["file_name"],
        overwrite=True,
        resume_from=f"checkpoints/{name}",
    )
    model, *_ = run_dreambooth(**resumed)
    assert _metadata("checkpoints", name)["steps"] == "2"
    # The resumed copy started from the saved weights (a step at lr 1e-12 moves nothing visible).
    torch.testing.assert_close(_unet_output(model), _unet_output(tuned), rtol=1e-3, atol=1e-3)
    assert not torch.equal(_unet_output(model), _unet_output(sd15["model"]))
    (Path(folder_paths.get_folder_paths("checkpoints")[0]) / name).unlink()


def test_resuming_the_other_kind_of_file_is_refused(sd15):
    inputs = _inputs(sd15, steps=1)
    run_dreambooth(**inputs)
    with pytest.raises(ValueError, match=r"mode 'full' continues a full checkpoint \(checkpoints/\.\.\.\)"):
        run_dreambooth(**_inputs(sd15, mode="full", resume_from=f"loras/{inputs['file_name']}.safetensors"))


@pytest.mark.parametrize("bf16", [True, False])
def test_full_fine_tuning_tells_comfyui_what_it_holds_beside_the_frozen_model(sd15, bf16):
    """The memory ComfyUI is asked to keep free is what the run then holds: its own weights and
    the optimizer state (the fused step keeps no whole-model gradients); on two processes sharing
    the optimizer state, this process's half of it."""
    settings = db.DreamBoothSettings(mode="full", steps=1, resolution=64, save=False, prior_preservation=False, full_bf16=bf16)
    images = TrainingImageSet.from_image_batch(_images())
    weights = diffusion_model.weight_count(sd15["model"])
    with torch.inference_mode(False), torch.enable_grad():
        plan = db.validate(settings, images, sd15["model"], sd15["clip"], None)
        one = db.DreamBoothTrainer(sd15["model"], sd15["clip"], sd15["vae"], images, settings, plan)
        asked = one.unet.memory_required - devices.training_memory(sd15["model"], 1, 64)
        one.step(1)
        held = sum(p.numel() * p.element_size() for p in one.unet.trained_parameters()) + optimizers.state_bytes(one.optimizer)
        half = db.DreamBoothTrainer(
            sd15["model"], sd15["clip"], sd15["vae"], images, settings, plan, partition=db.Partition(0, 2, shard_optimizer_state=True)
        )
        asked_half = half.unet.memory_required - devices.training_memory(sd15["model"], 1, 64)
    size = 2 if bf16 else 4
    assert sum(p.numel() for p in one.unet.trained_parameters()) == weights
    assert held == pytest.approx(asked, rel=0.01), f"asked ComfyUI for {asked} bytes, training holds {held}"
    assert asked == weights * 3 * size and asked_half == weights * 2 * size, "own weights + two moments; half the moments"
    assert any("GiB beyond the frozen model" in note for note in one.notes)
