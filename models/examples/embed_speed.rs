//! Sentences per second of an embedding model on one packed batch:
//! `cargo run --release -p kindling-models --example embed_speed -- DIR [SENTENCES] [BATCH]`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("model folder"));
    let count: usize = args.next().map_or(256, |a| a.parse().expect("count"));
    let batch: usize = args.next().map_or(32, |a| a.parse().expect("batch"));
    let model = kindling_models::EmbeddingModel::load(&dir).expect("loads");
    let words = "the of and to in is was for on that with as by at from his her an were which are this be or had not but one have they you all their has been more when will there would who so no".split(' ').collect::<Vec<_>>();
    let mut seed = 1u64;
    let sentences: Vec<Vec<u32>> = (0..count)
        .map(|_| {
            let text: Vec<&str> = (0..30)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    words[(seed >> 33) as usize % words.len()]
                })
                .collect();
            model.tokenize(&text.join(" "), true).unwrap().unwrap()
        })
        .collect();
    let run = || {
        for chunk in sentences.chunks(batch) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            std::hint::black_box(model.embed(&refs).unwrap());
        }
    };
    run();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        run();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{count} sentences in batches of {batch}: {:.0} sentences/s",
            count as f64 / s
        );
    }
}
