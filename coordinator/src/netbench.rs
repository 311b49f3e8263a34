//! `coordinator bench-cluster`: what the cluster costs on top of the engine.
//!
//! 1. **One MoE layer's round trip for one token** over loopback QUIC with real TLS: the token's
//!    hidden vector (DeepSeek-V3's 7168 wide by default) and its 8 experts, chosen like the
//!    router does (from at most 4 of 8 groups), spread over 3 workers that each hold whole
//!    groups. The workers run the real data-plane server, each on a runtime of its own as in
//!    the worker process, over stand-in experts of intermediate width `--expert-inter` (1 by
//!    default, so that nearly all that is left is the transport; on a small machine the three
//!    workers' compute would otherwise compete for the same cores and blur the split). Each
//!    result frame carries the worker's compute time. Reported: the layer's
//!    round trip p50/p99 as the generation loop sees it, the workers' compute, the codec's time
//!    for the same frames (serialisation), and what is left (network stack, QUIC, TLS, task
//!    wake-ups), plus bytes on the wire.
//! 2. **Decode through a cluster** (`--model`): tokens per second of the same model and prompt
//!    with the experts in this process and with them on `--workers` worker processes on
//!    loopback (the `worker` binary next to this one), and their ratio.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use coordinator::remote::{RemoteConfig, RemoteExperts, Routes};
use coordinator::server::{Cluster, ClusterOptions};
use engine::bench::splitmix;
use engine::model::kv_cache::CacheType;
use engine::model::moe::{LocalExperts, MoeScratch, RoutedExperts, Routing};
use engine::model::weights::{ExpertFilter, ExpertSet, Mlp};
use engine::model::{Logits, ModelFile, Workspace};
use engine::quant::QuantType;
use engine::tensor::Matrix;
use engine::Bytes;
use proto::control::JoinReply;
use proto::runtime::DataPlaneRuntime;
use proto::trust::{self, ClusterCa, Validity, WorkerKey};
use proto::wire::{Dtype, ExpertRequest, ExpertResult, Frame};
use tokio::sync::watch;

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Width of the hidden vector for the round-trip measurement.
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Round trips to time.
    #[arg(long, default_value_t = 2000)]
    iters: usize,
    /// Vectors on the wire.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    wire: String,
    /// Also compare decode speed in one process and through a loopback cluster on this model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Worker processes for the decode comparison.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Tokens to decode in each run of the comparison.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Compute threads of this process.
    #[arg(long)]
    threads: Option<usize>,
    /// The activation format of quantized products, in this process and, told by the
    /// coordinator, in the workers.
    #[command(flatten)]
    acts: crate::ActivationArgs,
    /// Compute threads of each worker process of the decode comparison.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Workers of the round-trip measurement, each holding whole groups (1 to 8): with one,
    /// every layer is a single exchange and nothing else competes for the cores.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
    round_trip_workers: u16,
    /// Busy-poll window of every data-plane thread, microseconds (0: off): after each
    /// exchange the thread polls its sockets this long instead of sleeping. The daemons'
    /// default.
    #[arg(long, default_value_t = proto::runtime::DEFAULT_BUSY_POLL_US)]
    busy_poll_us: u64,
    /// Intermediate width of the round trip's stand-in experts: 1 leaves almost nothing but
    /// the transport; larger values add real (BF16) expert compute to each round trip.
    #[arg(long, default_value_t = 1)]
    expert_inter: usize,
}

const N_EXPERTS: usize = 256;
const N_GROUPS: usize = 8;
const TOP_K: usize = 8;
const LAYER: usize = 3;

pub fn run(a: ClusterBenchArgs) -> Result<()> {
    crate::set_threads(a.threads)?;
    engine::tensor::set_activations(a.acts.activations);
    let dtype = if a.wire == "f32" {
        Dtype::F32
    } else {
        Dtype::Bf16
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    round_trip(
        &rt,
        a.hidden,
        a.expert_inter.max(1),
        a.iters,
        dtype,
        a.round_trip_workers as usize,
        Duration::from_micros(a.busy_poll_us),
    )?;
    if let Some(model) = &a.model {
        decode_comparison(
            &rt,
            model,
            a.workers,
            a.worker_threads,
            a.decode,
            dtype,
            a.busy_poll_us,
        )?;
    }
    Ok(())
}

/// Tiny BF16 experts of the given widths for the experts in `held`.
fn tiny_experts(hidden: usize, inter: usize, held: impl Fn(usize) -> bool) -> LocalExperts {
    let m = |rows: usize, cols: usize, seed: u64| {
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|i| {
                let r = splitmix(seed ^ i as u64);
                let v = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                half::bf16::from_f32(v).to_bits().to_le_bytes()
            })
            .collect();
        Matrix::new(QuantType::BF16, rows, cols, Bytes::from_vec(data)).expect("shape")
    };
    let experts = (0..N_EXPERTS)
        .map(|e| {
            held(e).then(|| Mlp {
                gate: m(inter, hidden, 3 * e as u64),
                up: m(inter, hidden, 3 * e as u64 + 1),
                down: m(hidden, inter, 3 * e as u64 + 2),
            })
        })
        .collect();
    let mut layers: Vec<Option<ExpertSet>> = (0..LAYER).map(|_| None).collect();
    layers.push(Some(ExpertSet { experts }));
    LocalExperts { hidden, layers }
}

/// Whole groups per worker: with 3 workers, groups 0-2 on worker 1, 3-5 on worker 2, 6-7 on
/// worker 3.
fn owner_of(e: usize, workers: usize) -> u64 {
    let g = e / (N_EXPERTS / N_GROUPS);
    1 + (g * workers / N_GROUPS) as u64
}

/// A router-like choice: 4 random groups, 8 random experts among them.
fn routing(seed: u64) -> Routing {
    let mut s = seed;
    let mut next = || {
        s = splitmix(s);
        s
    };
    let mut groups: Vec<usize> = (0..N_GROUPS).collect();
    for i in 0..4 {
        let j = i + (next() as usize) % (N_GROUPS - i);
        groups.swap(i, j);
    }
    let per = N_EXPERTS / N_GROUPS;
    let mut experts: Vec<u32> = Vec::new();
    while experts.len() < TOP_K {
        let g = groups[(next() as usize) % 4];
        let e = (g * per + (next() as usize) % per) as u32;
        if !experts.contains(&e) {
            experts.push(e);
        }
    }
    experts.sort_unstable();
    Routing {
        top_k: TOP_K,
        experts,
        weights: vec![0.3; TOP_K],
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn round_trip(
    rt: &tokio::runtime::Runtime,
    hidden: usize,
    inter: usize,
    iters: usize,
    dtype: Dtype,
    workers: usize,
    busy_poll: Duration,
) -> Result<()> {
    let dir = tempdir()?;
    let ca = ClusterCa::load_or_create(&dir)?;
    let token = ca.join_token();
    let server_id = ca.coordinator_identity(&["127.0.0.1".into()])?;
    let routes = Arc::new(Routes::default());
    let owners: Vec<u64> = (0..N_EXPERTS).map(|e| owner_of(e, workers)).collect();
    routes.set_owners(LAYER as u32, owners);

    // Both ends as in the daemons: each endpoint on a data-plane runtime of its own.
    let dp = Arc::new(DataPlaneRuntime::new()?);
    dp.set_busy_poll(busy_poll);
    let endpoint = {
        let _g = dp.handle().enter();
        trust::quic_endpoint(
            "127.0.0.1:0".parse()?,
            Some(trust::quic_server_config(&server_id)?),
        )?
    };
    let addr = endpoint.local_addr()?;
    let mut keep = Vec::new();
    for w in 1..=workers as u64 {
        let name = format!("bench-w{w}");
        let key = WorkerKey::generate(&name)?;
        let cert = ca.issue_worker(key.csr_der(), &name, Validity::days(1))?;
        let id = key.into_identity(
            &JoinReply {
                worker_cert_pem: cert,
                ca_cert_pem: ca.cert_pem().to_string(),
            },
            &token,
        )?;
        let experts = Arc::new(tiny_experts(hidden, inter, |e| owner_of(e, workers) == w));
        let exec = worker::compute::Executor::start(experts);
        let (_tx, rx) = watch::channel(Some(exec));
        let stats = Arc::new(worker::dataplane::Stats::default());
        let accept = {
            let endpoint = endpoint.clone();
            dp.handle().spawn(async move {
                let inc = endpoint.accept().await.context("no connection")?;
                anyhow::Ok(inc.await?)
            })
        };
        let wdp = DataPlaneRuntime::new()?;
        let quic_client = trust::quic_client_config(&id, &id.ca_pem)?;
        let conn = rt.block_on(wdp.spawn(async move {
            let mut ep = trust::quic_endpoint("127.0.0.1:0".parse()?, None)?;
            ep.set_default_client_config(quic_client);
            let c = ep.connect(addr, trust::COORDINATOR_NAME)?.await?;
            anyhow::Ok((ep, c))
        }))??;
        let incoming = rt.block_on(accept)??;
        wdp.set_busy_poll(busy_poll);
        let serving = wdp.spawn(worker::dataplane::serve(
            conn.1.clone(),
            rx,
            stats,
            Some(wdp.busy_poll()),
        ));
        routes.connect(w, name, incoming);
        keep.push((conn, _tx, serving, wdp));
    }
    let remote = RemoteExperts::new(
        dp.clone(),
        routes.clone(),
        RemoteConfig {
            hidden,
            dtype,
            timeout: Duration::from_secs(10),
        },
        None,
    );

    let xs: Vec<f32> = engine::bench::random_f32(hidden, 9);
    let mut out = vec![0f32; hidden];
    let mut scratch = MoeScratch::default();
    let mut totals = Vec::with_capacity(iters);
    // Each round trip less its slowest worker's compute in that same layer.
    let mut beyond = Vec::with_capacity(iters);
    let mut workers_touched = 0usize;
    // Warm-up (connections, congestion windows, path MTU discovery).
    for i in 0..50 {
        remote.eval(LAYER, &xs, &routing(i), &mut out, &mut scratch)?;
    }
    for w in 1..=workers as u64 {
        if let Some(s) = routes.stats(w) {
            s.clear_samples();
            s.bytes_out.store(0, Ordering::Relaxed);
            s.bytes_in.store(0, Ordering::Relaxed);
        }
    }
    // UDP datagrams both ways, counted at the workers' ends of the connections.
    let datagrams = || -> u64 {
        keep.iter()
            .map(|k| {
                let s = k.0 .1.stats();
                s.udp_tx.datagrams + s.udp_rx.datagrams
            })
            .sum()
    };
    let datagrams_before = datagrams();
    for i in 0..iters {
        let r = routing(1000 + i as u64);
        let mut ws: Vec<u64> = r
            .experts
            .iter()
            .map(|&e| owner_of(e as usize, workers))
            .collect();
        ws.dedup();
        workers_touched += ws.len();
        let t = Instant::now();
        remote.begin(LAYER, &xs, &r)?;
        remote.eval(LAYER, &xs, &r, &mut out, &mut scratch)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        totals.push(us);
        beyond.push(us - remote.last_compute_us() as f64);
    }
    let (mut bytes, mut compute50, mut compute99) = (0u64, 0f64, 0f64);
    for w in 1..=workers as u64 {
        if let Some(s) = routes.stats(w) {
            bytes += s.bytes_out.load(Ordering::Relaxed) + s.bytes_in.load(Ordering::Relaxed);
            if let Some((c50, c99)) = s.compute_percentiles() {
                compute50 = compute50.max(c50 as f64);
                compute99 = compute99.max(c99 as f64);
            }
        }
    }
    // Serialisation: the codec on frames of the same size, both directions, both ends.
    let req = ExpertRequest {
        request_id: 1,
        layer: LAYER as u32,
        hidden,
        dtype,
        counts: vec![3],
        experts: vec![1, 2, 3],
        weights: vec![0.3; 3],
        xs: xs.clone(),
    };
    let res = ExpertResult {
        request_id: 1,
        layer: LAYER as u32,
        hidden,
        dtype,
        compute_us: 0,
        ys: xs.clone(),
    };
    let mut codec = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut b = Vec::new();
        req.encode(&mut b)?;
        let _ = Frame::decode_all(&b)?;
        b.clear();
        res.encode(&mut b)?;
        let _ = Frame::decode_all(&b)?;
        codec.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let ser = pct(&mut codec, 0.5);
    let p50 = pct(&mut totals.clone(), 0.5);
    let p99 = pct(&mut totals, 0.99);
    let per_layer_bytes = bytes as f64 / iters as f64;
    let per_layer_datagrams = (datagrams() - datagrams_before) as f64 / iters as f64;
    println!(
        "MoE layer round trip, 1 token, hidden {hidden} {:?}, {TOP_K} experts (inter {inter}) over {workers} workers (avg {:.2} touched), {iters} layers:",
        dtype,
        workers_touched as f64 / iters as f64
    );
    println!("  round trip  p50 {p50:8.1} us   p99 {p99:8.1} us");
    println!("  worker compute (slowest worker)  p50 {compute50:8.1} us   p99 {compute99:8.1} us");
    println!("  serialisation (encode+decode, request and result, one worker)  p50 {ser:8.1} us");
    println!(
        "  network, QUIC/TLS and scheduling (p50 round trip - compute - serialisation) {:8.1} us",
        p50 - compute50 - ser
    );
    let (b50, b99) = (pct(&mut beyond, 0.5), pct(&mut beyond, 0.99));
    println!("  round trip less that layer's slowest compute  p50 {b50:8.1} us   p99 {b99:8.1} us");
    println!(
        "  bytes on the wire: {per_layer_bytes:.0} per layer and token, {:.0} KB per token over 58 MoE layers; {per_layer_datagrams:.2} UDP datagrams per layer",
        per_layer_bytes * 58.0 / 1e3
    );
    drop(keep);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn decode_comparison(
    rt: &tokio::runtime::Runtime,
    path: &std::path::Path,
    workers: usize,
    worker_threads: usize,
    n_decode: usize,
    dtype: Dtype,
    busy_poll_us: u64,
) -> Result<()> {
    let mf =
        Arc::new(ModelFile::open(path).with_context(|| format!("opening {}", path.display()))?);
    let model = Arc::new(mf.load_model()?);
    let prompt: Vec<u32> = (0..16).map(|i| (i * 37 + 5) as u32 % 1000).collect();
    let decode = |experts: &dyn RoutedExperts| -> Result<f64> {
        let mut cache = model.new_cache(CacheType::F16, prompt.len() + n_decode + 1);
        let mut ws = Workspace::default();
        let logits = model.forward(&prompt, &mut cache, experts, &mut ws, Logits::Last)?;
        let mut tok = argmax(logits);
        let t = Instant::now();
        for _ in 0..n_decode {
            let l = model.forward(&[tok], &mut cache, experts, &mut ws, Logits::Last)?;
            tok = argmax(l);
        }
        Ok(n_decode as f64 / t.elapsed().as_secs_f64())
    };
    let local = mf.load_experts(&ExpertFilter::All)?;
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join(format!("worker{}", std::env::consts::EXE_SUFFIX)))
        .filter(|b| b.exists())
        .context("the `worker` binary is not next to this one (build it: cargo build --release -p worker)")?;
    let dir = tempdir()?;
    let cluster = rt.block_on(Cluster::start(ClusterOptions {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.join("coordinator"),
        min_workers: workers,
        model_name: path.display().to_string(),
        model_fingerprint: mf.fingerprint(),
        layout: mf.expert_layout()?,
        n_groups: model.cfg.n_group,
        hidden: model.cfg.hidden,
        dtype,
        heartbeat_timeout: Duration::from_secs(10),
        copies: 1,
        request_timeout: Duration::from_secs(30),
        names: vec![],
        local: None,
        model: Some(mf.clone()),
        activations: engine::tensor::activations(),
        device: "cpu".into(),
        busy_poll: Duration::from_micros(busy_poll_us),
    }))?;
    let mut procs = Vec::new();
    for w in 0..workers {
        let child = Command::new(&bin)
            .args(["--coordinator", &cluster.addr.to_string()])
            .args(["--join-token", &cluster.token.to_string()])
            .args([
                "--name",
                &format!("bench-{w}"),
                "--threads",
                &worker_threads.to_string(),
                "--memory",
                "64",
                "--busy-poll-us",
                &busy_poll_us.to_string(),
            ])
            .arg("--model")
            .arg(path)
            .arg("--state-dir")
            .arg(dir.join(format!("w{w}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.push(Proc(child));
    }
    if !rt.block_on(cluster.wait_serving(Duration::from_secs(600))) {
        bail!("the cluster did not become ready: {:?}", cluster.status());
    }
    let remote = cluster.experts();
    // Interleave the two setups, three times each; report medians.
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(decode(&local)?);
        many.push(decode(remote.as_ref())?);
    }
    let (o, m) = (pct(&mut one, 0.5), pct(&mut many, 0.5));
    println!(
        "decode on {}: one process {o:.2} tok/s, {workers}-worker loopback cluster {m:.2} tok/s: ratio {:.2} (median of 3, {n_decode} tokens each)",
        path.display(),
        m / o
    );
    let compute: std::collections::HashMap<String, (u32, u32)> = cluster
        .worker_stats()
        .into_iter()
        .filter_map(|(name, s)| Some((name, s.compute_percentiles()?)))
        .collect();
    for w in &cluster.status().workers {
        let (c50, c99) = compute.get(&w.name).copied().unwrap_or_default();
        println!(
            "  {}: {} experts, {} requests, round trip p50 {} us p99 {} us, its compute p50 {c50} us p99 {c99} us",
            w.name, w.experts_held, w.requests_served, w.rtt_p50_us, w.rtt_p99_us
        );
    }
    drop(procs);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

fn tempdir() -> Result<PathBuf> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "dsv3-bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
