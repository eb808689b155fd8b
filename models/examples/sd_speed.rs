//! Times Kindling's Stable Diffusion pipeline in process: seconds per UNet
//! step and per image, for a diffusers folder, from the same unit-normal
//! latents the diffusers side of `benches/images.py` uses.
//!
//! `cargo run --release -p kindling-models --example sd_speed -- DIR SIZE STEPS BATCH RUNS [DEVICE [DTYPE]]`
//!
//! DEVICE is `cpu` (the default, in the weights' type) or `cuda:N` (in
//! DTYPE: bf16 by default, f16 or f32). Prints one JSON line per run:
//! {"step_s": …, "image_s": …, "batch": …}; the first run on a GPU
//! includes its warm-up.

use std::path::PathBuf;
use std::time::Instant;

use kindling_models::diffusion::{ImageJob, Noise, Pipeline, SamplerKind};
use kindling_models::{gpu, DType, Device};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: sd_speed DIR SIZE STEPS BATCH RUNS [DEVICE [DTYPE]]")?,
    );
    let num = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (size, steps, batch, runs) = (num(1, 256), num(2, 4), num(3, 1), num(4, 3));
    let pipe = match args.get(5).map(String::as_str) {
        None | Some("cpu") => Pipeline::load(&dir, &Device::Cpu)?,
        Some(name) => {
            let ordinal = name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or("DEVICE is cpu or cuda:N")?;
            let dtype = match args.get(6).map(String::as_str) {
                None | Some("bf16") => DType::BF16,
                Some("f16") => DType::F16,
                Some("f32") => DType::F32,
                Some(other) => return Err(format!("DTYPE {other}: bf16, f16 or f32").into()),
            };
            Pipeline::load_as(&dir, &gpu::device(ordinal)?, dtype)?
        }
    };
    let prompt = pipe.encode_prompt(
        "a photo of an astronaut riding a horse on mars",
        Some("blurry"),
    )?;
    let schedule = pipe.schedule(SamplerKind::Ddim, steps);
    let len = pipe.latent_len(size, size);
    for _ in 0..runs {
        let mut jobs: Vec<ImageJob> = (0..batch)
            .map(|i| ImageJob::from_latents(Noise::new(i as u64).normals(len), 7.5, Noise::new(0)))
            .collect();
        let start = Instant::now();
        let encoded = pipe.encode_prompt(
            "a photo of an astronaut riding a horse on mars",
            Some("blurry"),
        )?;
        let mut step_s = Vec::new();
        for i in 0..steps {
            let t = Instant::now();
            let mut rows: Vec<_> = jobs.iter_mut().map(|j| (&prompt, j)).collect();
            pipe.step(&schedule, i, &mut rows, size, size)?;
            step_s.push(t.elapsed().as_secs_f64());
        }
        for job in &jobs {
            pipe.decode(&job.latents, size, size)?;
        }
        drop(encoded);
        let total = start.elapsed().as_secs_f64();
        step_s.sort_by(f64::total_cmp);
        println!(
            "{{\"step_s\": {:.4}, \"image_s\": {:.4}, \"batch\": {batch}, \"size\": {size}, \"steps\": {steps}}}",
            step_s[step_s.len() / 2],
            total / batch as f64
        );
    }
    Ok(())
}
