"""--pretrained honours every scheduler field that changes a result, or refuses it in one line: each field
against diffusers' own pipeline at equal per-image noise (tiny random UNet2DModel saved locally)."""

import pytest
import torch
from diffusers import (ConsistencyModelPipeline, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,
                       EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel)

import samplers
from diffusion.pretrained import load_pretrained
from diffusion.scheduler_fields import native_noise_scale, native_sampling
from samplers.noise import generators, randn

N, SEED = 3, 4


def tiny_unet(out_channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def theirs_and_ours(tmp_path, pipe_cls, scheduler, steps, sampler, opts=None, out_channels=1, **call):
    """The pipeline's final (unclamped) state and ours from the loaded folder, same per-image noise."""
    pipe_cls(unet=tiny_unet(out_channels), scheduler=scheduler).save_pretrained(tmp_path / "p")
    pipe = pipe_cls.from_pretrained(tmp_path / "p")
    pipe.set_progress_bar_config(disable=True)
    last, step = [], pipe.scheduler.step

    def keep(*a, **k):
        out = step(*a, **k)
        last[:] = [out[0]]
        return out

    pipe.scheduler.step = keep
    pipe(batch_size=N, generator=generators(SEED, N), num_inference_steps=steps, output_type="np", **call)
    model, _ = load_pretrained(str(tmp_path / "p"))
    opts = dict(opts or {})
    grid, extra = native_sampling(model, model.diffusers_scheduler, sampler, steps, opts)
    assert grid is not None
    gens = generators(SEED, N)  # the initial noise, then (stochastic samplers) every step's noise, as diffusers draws
    noise = randn((N, 1, 8, 8), gens)
    noise = noise * native_noise_scale(model, model.diffusers_scheduler, grid)
    ours = samplers.sample(model, noise, sampler=sampler, grid=grid, generator=gens, **opts, **extra).x
    return last[0], ours


def assert_close(theirs, ours, tol=2e-5):
    scale = max(theirs.abs().max().item(), 1.0)
    assert (theirs - ours).abs().max().item() <= tol * scale, ((theirs - ours).abs().max().item(), scale)


def refused(tmp_path, pipe_cls, scheduler, field, sampler="ddim", steps=10, out_channels=1):
    pipe_cls(unet=tiny_unet(out_channels), scheduler=scheduler).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError) as e:
        model, _ = load_pretrained(str(tmp_path / "r"))
        native_sampling(model, model.diffusers_scheduler, sampler, steps, {})
    line = str(e.value)
    assert "\n" not in line and field in line, line
    return line


@pytest.mark.parametrize("clip_range", [0.3, 1.0])
def test_clip_sample(tmp_path, clip_range):
    sched = DDIMScheduler(clip_sample=True, clip_sample_range=clip_range)
    theirs, ours = theirs_and_ours(tmp_path, DDIMPipeline, sched, 8, "ddim", eta=0.0, use_clipped_model_output=True)
    assert_close(theirs, ours)
    # the clip bites: without it the result differs
    sched = DDIMScheduler(clip_sample=False)
    plain, _ = theirs_and_ours(tmp_path / "plain", DDIMPipeline, sched, 8, "ddim", eta=0.0)
    assert (plain - theirs).abs().max() > 0.1


def test_thresholding(tmp_path):
    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5, prediction_type="sample")
    theirs, ours = theirs_and_ours(tmp_path, DDIMPipeline, sched, 6, "ddim", eta=0.0, use_clipped_model_output=True)
    assert_close(theirs, ours)
    assert theirs.abs().max() <= 1.5 + 1e-6


@pytest.mark.parametrize("spacing,steps", [("leading", 6), ("trailing", 10), ("leading", 7)])
def test_timestep_spacing(tmp_path, spacing, steps):
    sched = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, steps_offset=1 if steps == 7 else 0)
    theirs, ours = theirs_and_ours(tmp_path, DDIMPipeline, sched, steps, "ddim", eta=0.0)
    assert_close(theirs, ours)


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 6)])
def test_timestep_spacing_without_a_grid_is_refused(tmp_path, spacing, steps):
    line = refused(tmp_path, DDIMPipeline, DDIMScheduler(clip_sample=False, timestep_spacing=spacing), "timestep_spacing",
                   steps=steps)
    assert repr(spacing) in line


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_variance_type(tmp_path, variance_type):
    sched = DDPMScheduler(clip_sample=False, variance_type=variance_type)
    theirs, ours = theirs_and_ours(tmp_path, DDPMPipeline, sched, 10, "ddim")
    assert_close(theirs, ours)


def test_learned_variance_is_refused_for_ddpm_steps(tmp_path):
    line = refused(tmp_path, DDPMPipeline, DDPMScheduler(variance_type="learned_range"), "variance_type", out_channels=2)
    assert "'learned_range'" in line


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_type(tmp_path, prediction_type):
    sched = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    theirs, ours = theirs_and_ours(tmp_path, DDIMPipeline, sched, 5, "ddim", eta=0.0)
    assert_close(theirs, ours)


@pytest.mark.parametrize("kw", [dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                dict(beta_schedule="squaredcos_cap_v2"),
                                dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())])
def test_beta_schedules(tmp_path, kw):
    theirs, ours = theirs_and_ours(tmp_path, DDIMPipeline, DDIMScheduler(clip_sample=False, **kw), 6, "ddim", eta=0.0)
    assert_close(theirs, ours)


def test_zero_terminal_snr_is_refused(tmp_path):
    sched = DDIMScheduler(rescale_betas_zero_snr=True, clip_sample=False)
    assert "True" in refused(tmp_path, DDIMPipeline, sched, "rescale_betas_zero_snr")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift(tmp_path, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs, ours = theirs_and_ours(tmp_path, DDPMPipeline, sched, 6, "flow_euler")
    assert_close(theirs, ours)


def test_dynamic_flow_shift_is_refused(tmp_path):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert "use_dynamic_shifting=True" in refused(tmp_path, DDPMPipeline, sched, "use_dynamic_shifting", "flow_euler")


@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_edm_sigma_schedule(tmp_path, sigma_schedule):
    sched = EDMEulerScheduler(sigma_schedule=sigma_schedule)
    theirs, ours = theirs_and_ours(tmp_path, ConsistencyModelPipeline, sched, 6, "euler")
    assert_close(theirs, ours)


def test_edm_v_prediction_and_final_sigma_min_are_refused(tmp_path):
    refused(tmp_path / "a", ConsistencyModelPipeline, EDMEulerScheduler(prediction_type="v_prediction"), "prediction_type",
            "euler")
    refused(tmp_path / "b", ConsistencyModelPipeline, EDMEulerScheduler(final_sigmas_type="sigma_min"),
            "final_sigmas_type", "euler")


def test_ddim_ending_short_of_x0_is_refused(tmp_path):
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    assert "set_alpha_to_one=False" in refused(tmp_path, DDIMPipeline, sched, "set_alpha_to_one")
