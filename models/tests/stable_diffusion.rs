//! Known answer for the Stable Diffusion pipeline: Kindling's random-weight
//! `sd-tiny` (and its SDXL-shaped sibling) rendered by diffusers from fixed
//! latents (`scripts/sd_reference.py`), then by Kindling from the same
//! latents; the decoded pixels must agree within 2 of 255.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use candle_core::DType;
use kindling_models::diffusion::random::{write_pipeline, Preset};
use kindling_models::diffusion::{ImageJob, Noise, Pipeline, SamplerKind};
use kindling_models::Device;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes the preset's pipeline fresh and checks its weights are the ones
/// the reference was rendered from.
fn pipeline(preset: Preset, tag: &str, reference: &Value) -> Pipeline {
    pipeline_on(preset, tag, reference, &Device::Cpu, DType::F32)
}

/// As [`pipeline`], loaded onto `device` in `dtype`.
fn pipeline_on(
    preset: Preset,
    tag: &str,
    reference: &Value,
    device: &Device,
    dtype: DType,
) -> Pipeline {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(tag);
    write_pipeline(&dir, preset, DType::F32, 0).unwrap();
    for (component, sha) in reference["weights_sha256"].as_object().unwrap() {
        let file = std::fs::read_dir(dir.join(component))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .unwrap();
        let got = format!("{:x}", Sha256::digest(std::fs::read(&file).unwrap()));
        assert_eq!(
            &got,
            sha.as_str().unwrap(),
            "{component}: weights differ from the reference's; rerun scripts/sd_reference.py"
        );
    }
    Pipeline::load_as(&dir, device, dtype).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn check(pipe: &Pipeline, reference: &Value) {
    check_within(pipe, reference, 2, 1.0);
}

/// Every run's pixels within `max` of the reference, and within `mean` on
/// average.
fn check_within(pipe: &Pipeline, reference: &Value, max: i64, mean_max: f64) {
    let size = reference["size"].as_u64().unwrap() as usize;
    let latents = floats(&reference["latents"]);
    let tokens: Vec<u32> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        pipe.tokenize(reference["prompt"].as_str().unwrap())
            .unwrap(),
        tokens
    );
    let prompt = pipe
        .encode_prompt(
            reference["prompt"].as_str().unwrap(),
            reference["negative_prompt"].as_str(),
        )
        .unwrap();
    for run in reference["runs"].as_array().unwrap() {
        let kind = SamplerKind::parse(run["sampler"].as_str().unwrap()).unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let guidance = run["guidance"].as_f64().unwrap() as f32;
        let schedule = pipe.schedule(kind, steps);
        let sigma = schedule.init_noise_sigma() as f32;
        let mut job = ImageJob::from_latents(
            latents.iter().map(|x| x * sigma).collect(),
            guidance,
            Noise::new(0),
        );
        for i in 0..steps {
            pipe.step(&schedule, i, &mut [(&prompt, &mut job)], size, size)
                .unwrap();
        }
        let pixels = pipe.decode(&job.latents, size, size).unwrap();
        let want: Vec<i64> = run["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(pixels.len(), want.len());
        let worst = pixels
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i64 - b).abs())
            .max()
            .unwrap();
        let mean = pixels
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i64 - b).abs())
            .sum::<i64>() as f64
            / want.len() as f64;
        println!(
            "{} guidance {guidance}: max |Δ| {worst}, mean |Δ| {mean:.4}",
            kind.name()
        );
        assert!(
            worst <= max && mean <= mean_max,
            "{} guidance {guidance}: pixel difference max {worst} (bar {max}), mean {mean:.3} (bar {mean_max})",
            kind.name()
        );
    }
}

#[test]
fn sd_tiny_matches_diffusers() {
    let reference = reference("sd_tiny_reference.json");
    let pipe = pipeline(Preset::Tiny, "sd-tiny", &reference);
    check(&pipe, &reference);
}

/// The device path (candle's convolutions and products, the fused
/// GroupNorm+SiLU kernel) in half precision stays close to diffusers' f32
/// images: f16 on the CPU (candle's CPU convolutions have no bf16), and
/// bf16 on `cuda:0` where there is one.
#[test]
fn half_precision_device_path_tracks_diffusers() {
    let mut runs = vec![(Device::Cpu, DType::F16)];
    match kindling_models::gpu::device(0) {
        Ok(d) => runs.push((d, DType::BF16)),
        Err(why) => common::skip_cuda("the CUDA image path", &why),
    }
    for (device, dtype) in runs {
        for (preset, file) in [
            (Preset::Tiny, "sd_tiny_reference.json"),
            (Preset::TinyXl, "sd_tiny_xl_reference.json"),
            (Preset::TinyV, "sd_tiny_v_reference.json"),
        ] {
            let reference = reference(file);
            let tag = format!("{dtype:?}-{preset:?}-{:?}", device.location());
            let pipe = pipeline_on(preset, &tag, &reference, &device, dtype);
            let (max, mean) = if dtype == DType::F16 {
                (6, 1.0)
            } else {
                (24, 3.0)
            };
            check_within(&pipe, &reference, max, mean);
        }
    }
}

#[test]
fn sdxl_shaped_tiny_matches_diffusers() {
    let reference = reference("sd_tiny_xl_reference.json");
    let pipe = pipeline(Preset::TinyXl, "sd-tiny-xl", &reference);
    check(&pipe, &reference);
}

/// An image's latents after every step are the same bits alone or batched
/// with others of other prompts, guidance scales and seeds.
#[test]
fn batched_images_equal_their_solo_runs() {
    for (preset, file) in [
        (Preset::Tiny, "sd_tiny_reference.json"),
        (Preset::TinyXl, "sd_tiny_xl_reference.json"),
    ] {
        batch_invariance(&pipeline(
            preset,
            &format!("{preset:?}-batch"),
            &reference(file),
        ));
    }
}

fn batch_invariance(pipe: &Pipeline) {
    let size = 64;
    let len = pipe.latent_len(size, size);
    for kind in [SamplerKind::EulerAncestral, SamplerKind::DpmPp2m] {
        let schedule = pipe.schedule(kind, 3);
        let prompts = [
            pipe.encode_prompt("a red cat", None).unwrap(),
            pipe.encode_prompt("a castle in the snow at night", Some("blurry"))
                .unwrap(),
            pipe.encode_prompt("", None).unwrap(),
        ];
        let setups = [(7u64, 7.5f32), (8, 1.0), (9, 3.0)];
        let solo: Vec<Vec<f32>> = setups
            .iter()
            .zip(&prompts)
            .map(|(&(seed, g), p)| {
                let mut job = ImageJob::from_seed(seed, g, len, &schedule);
                for i in 0..3 {
                    pipe.step(&schedule, i, &mut [(p, &mut job)], size, size)
                        .unwrap();
                }
                job.latents
            })
            .collect();
        let mut jobs: Vec<ImageJob> = setups
            .iter()
            .map(|&(seed, g)| ImageJob::from_seed(seed, g, len, &schedule))
            .collect();
        for i in 0..3 {
            let mut batch: Vec<_> = prompts.iter().zip(jobs.iter_mut()).collect();
            pipe.step(&schedule, i, &mut batch, size, size).unwrap();
        }
        for (k, job) in jobs.iter().enumerate() {
            assert!(job.latents.iter().all(|x| x.is_finite()));
            let diff = job
                .latents
                .iter()
                .zip(&solo[k])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let maxd = job
                .latents
                .iter()
                .zip(&solo[k])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff == 0,
                "{} image {k}: {diff} values differ batched, by up to {maxd}",
                kind.name()
            );
        }
    }
}

/// SD 2.x/Turbo shape: v-prediction, trailing timesteps, linear
/// projections, a GELU text encoder and `!` padding.
#[test]
fn sd2_shaped_tiny_matches_diffusers() {
    let reference = reference("sd_tiny_v_reference.json");
    let pipe = pipeline(Preset::TinyV, "sd-tiny-v", &reference);
    check(&pipe, &reference);
}
