"""diffusers UNet2DModel + scheduler folders behind the ScoreModel interface (offline, tiny random models)."""

import copy
import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

import samplers
from diffusion.likelihood import log_likelihood
from diffusion.pretrained import load_pretrained, schedule_from_scheduler
from samplers.noise import generators, randn


def tiny_unet(seed: int = 0, out_channels: int = 1, **kw) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8, **kw)


def save_pipeline(folder, prediction_type="epsilon", **sched_kw):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type, **sched_kw)
    DDIMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_matches_diffusers_pipeline(tmp_path, prediction_type):
    folder = save_pipeline(tmp_path / "pipe", prediction_type)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    finals = []
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):  # keep the unclamped last state (the pipeline clamps to [0, 1])
        out = step(*args, **kwargs)
        finals.append(out.prev_sample)
        return out

    pipe.scheduler.step = recording_step
    images = pipe(batch_size=3, generator=generators(11, 3), eta=0.0, num_inference_steps=8, output_type="np").images
    theirs = finals[-1]

    model, info = load_pretrained(str(folder))
    assert info["prediction_type"] == prediction_type and len(info["sha256"]) == 64
    s = model.schedule
    ts = pipe.scheduler.timesteps.double()  # diffusers' integer timesteps, high to low
    grid = torch.cat([s.sigma_edm(s.index_to_t(ts)), torch.zeros(1, dtype=torch.float64)])
    noise = randn((3, 1, 8, 8), generators(11, 3))  # the pipeline's own per-image draws
    ours = samplers.get("ddim")(model, noise, grid, eta=0.0)
    assert model.nfe == len(ts)
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(scale, 1.0), (scale, (ours - theirs).abs().max())
    ours_img = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours_img - images).max() < 1e-5


def test_scheduler_betas_become_our_knots(tmp_path):
    for sched in (DDPMScheduler(beta_schedule="squaredcos_cap_v2"), DDPMScheduler(beta_schedule="linear")):
        s = schedule_from_scheduler(sched)
        n = torch.arange(1000)
        a2 = s.alpha(s.index_to_t(n)) ** 2
        assert torch.allclose(a2, sched.alphas_cumprod.double(), rtol=1e-12, atol=0)
        assert torch.allclose(s.t_to_index(s.index_to_t(n)), n.double(), atol=1e-9)


def test_learned_variance_uses_the_mean_half_and_index_conditioning(tmp_path):
    DDIMPipeline(unet=tiny_unet(out_channels=2), scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "p")
    model, _ = load_pretrained(str(tmp_path / "p"))
    x = torch.randn(2, 1, 8, 8)
    t = model.schedule.index_to_t(torch.tensor([500.0, 20.0]))
    raw = model.net.unet(x, torch.tensor([500.0, 20.0]), return_dict=False)[0]
    assert torch.allclose(model(x, t).eps, raw[:, :1], atol=1e-6)


def test_every_sampler_skip_tuning_and_likelihood_run_on_it(tmp_path):
    model, _ = load_pretrained(str(save_pipeline(tmp_path / "p", "sample")))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in samplers.available():
        if name == "adaptive":
            grid = torch.tensor([model.schedule.sigma_edm_max, 0.01, 0.0], dtype=torch.float64)
            res = samplers.sample(model, noise, sampler=name, grid=grid, rtol=1e-2, atol=1e-2)
        else:
            res = samplers.sample(model, noise, sampler=name, nfe=samplers.nfe_of(name, 3))
        assert torch.isfinite(res.x).all() and res.nfe > 0, name
    base = samplers.sample(model, noise, sampler="euler", nfe=3).x
    with samplers.skip_tuning(model, 1.0):
        assert torch.equal(samplers.sample(model, noise, sampler="euler", nfe=3).x, base)  # rho = 1 is bit-exact
    with samplers.skip_tuning(model, 0.5) as factors:
        tuned = samplers.sample(model, noise, sampler="euler", nfe=3).x
    assert len(factors) == model.net.num_skips == 4 and factors[-1] == 0.5  # conv_in + (resnet, downsample) + resnet
    assert (tuned - base).abs().max() > 1e-4
    assert model.net.bottleneck_features().shape == (2, 16)
    res = log_likelihood(model, noise[:1] * 0.5, t_eps=1e-3, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.log_prob).all() and res.nfe > 0


def test_deepcopy_keeps_its_own_hooks(tmp_path):
    # SiD and EMA copy the whole ScoreModel: the copy's bottleneck capture must follow the copy
    model, _ = load_pretrained(str(save_pipeline(tmp_path / "p")))
    twin = copy.deepcopy(model)
    twin.net.unet.requires_grad_(True)
    x = torch.randn(2, 1, 8, 8)
    loss = twin(x, 0.5).x0.square().mean()
    loss.backward()
    assert twin.net.unet.conv_in.weight.grad is not None
    assert model.net._mid.value is None and twin.net.bottleneck_features().shape == (2, 16)


def test_bad_pretrained_folders(tmp_path):
    folder = save_pipeline(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub id"):
        load_pretrained(str(tmp_path / "nowhere" / "x" / "y"))
    (folder / "scheduler" / "scheduler_config.json").rename(folder / "scheduler" / "moved.json")
    with pytest.raises(FileNotFoundError, match="missing \\['scheduler/scheduler_config.json'\\]"):
        load_pretrained(str(folder))
    (folder / "scheduler" / "moved.json").rename(folder / "scheduler" / "scheduler_config.json")
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "rescale_betas_zero_snr": True}))
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        load_pretrained(str(folder))
    model, _ = load_pretrained(str(save_pipeline(tmp_path / "q")))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 1, 8, 8), 0.5, class_labels=torch.tensor([0]))


def test_hub_id_offline_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch 'google/ddpm-cifar10-32' from the Hugging Face Hub"):
        load_pretrained("google/ddpm-cifar10-32")
