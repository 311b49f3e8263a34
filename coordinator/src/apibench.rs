//! `coordinator bench-api`: load on a running API. For each concurrency level, that many
//! streaming chat requests start together (greedy, different prompts, a fixed answer length);
//! it reports the aggregate generated tokens per second and the time to first token (p50,
//! max), the median over rounds.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use coordinator::cli::chat::SseParser;
use serde_json::{json, Value};

#[derive(Args)]
pub struct BenchApiArgs {
    /// Base URL of the API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    #[arg(long)]
    api_key: Option<String>,
    /// Concurrent streams, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Tokens per answer (the answers are cut at this length).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Rounds per level (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One request's timings.
struct Sample {
    ttft: Duration,
    tokens: u64,
}

async fn one(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    i: usize,
    max_tokens: usize,
) -> Result<Sample> {
    let body = json!({
        "messages": [{"role": "user", "content": format!("Request {i}: tell me about the number {}.", i * 7 + 3)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = http.post(url).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    let mut r = req.send().await?;
    if !r.status().is_success() {
        bail!(
            "HTTP {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let mut parser = SseParser::new();
    let (mut ttft, mut tokens) = (None, 0);
    while let Some(bytes) = r.chunk().await? {
        for data in parser.push(&bytes)? {
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(&data)?;
            if let Some(e) = v.get("error") {
                bail!("stream failed: {e}");
            }
            let d = &v["choices"][0]["delta"];
            let text = d["content"].as_str().unwrap_or("").len()
                + d["reasoning_content"].as_str().unwrap_or("").len();
            if ttft.is_none() && text > 0 {
                ttft = Some(t0.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
    }
    Ok(Sample {
        ttft: ttft.unwrap_or_else(|| t0.elapsed()),
        tokens,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: BenchApiArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = a.api.trim_end_matches('/');
    let url = format!(
        "{}/v1/chat/completions",
        base.strip_suffix("/v1").unwrap_or(base)
    );
    let http = reqwest::Client::new();
    rt.block_on(async {
        // Warm-up: the first request pays for page faults and lazy allocations.
        one(&http, &url, a.api_key.as_deref(), 0, 4)
            .await
            .with_context(|| format!("warm-up request to {url}"))?;
        println!(
            "{:>6} {:>12} {:>12} {:>12} {:>10}",
            "conc", "tok/s", "ttft p50 ms", "ttft max ms", "tokens"
        );
        for &c in &a.concurrency {
            let (mut rates, mut p50s, mut maxes, mut counts) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for round in 0..a.rounds.max(1) {
                let t0 = Instant::now();
                let tasks: Vec<_> = (0..c)
                    .map(|i| {
                        let (http, url, key) = (http.clone(), url.clone(), a.api_key.clone());
                        let n = a.max_tokens;
                        tokio::spawn(async move {
                            one(&http, &url, key.as_deref(), round * 1000 + i, n).await
                        })
                    })
                    .collect();
                let mut samples = Vec::new();
                for t in tasks {
                    samples.push(t.await??);
                }
                let wall = t0.elapsed().as_secs_f64();
                let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
                let mut ttfts: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64()).collect();
                ttfts.sort_by(f64::total_cmp);
                rates.push(tokens as f64 / wall);
                p50s.push(ttfts[ttfts.len() / 2] * 1e3);
                maxes.push(ttfts[ttfts.len() - 1] * 1e3);
                counts.push(tokens as f64);
            }
            println!(
                "{c:>6} {:>12.1} {:>12.1} {:>12.1} {:>10.0}",
                median(rates),
                median(p50s),
                median(maxes),
                median(counts)
            );
        }
        Ok(())
    })
}
