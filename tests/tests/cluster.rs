//! A real cluster on loopback: the coordinator's cluster side in this process, two `worker`
//! daemons as separate processes, real TLS, real gRPC, real QUIC. The routed experts of a
//! synthetic DeepSeek-V3-shaped model are placed on the workers; the logits of a forward pass
//! through the cluster must match the same model run in one process. Then a worker is killed
//! (requests fail quickly, naming the missing experts), restarted (serving resumes), and a
//! worker with a wrong join token is refused.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{spawn, start_cluster, worker_bin, Worker};
use coordinator::server::Cluster;
use engine::model::kv_cache::CacheType;
use engine::model::moe::{ExpertError, RoutedExperts};
use engine::model::weights::ExpertFilter;
use engine::model::{ForwardError, Logits, Model, ModelFile, Workspace};
use engine::synth::{write_model, SynthSpec};
use proto::wire::Dtype;

/// Memory for exactly 32 of the tiny model's experts (196,608 bytes each in BF16), so that two
/// workers split the 64 experts evenly and neither can take over the other's share.
const HALF: &str = "0.00586";

fn spawn_worker(
    addr: &str,
    token: Option<&str>,
    model: &Path,
    state: &Path,
    name: &str,
    memory_gib: &str,
) -> Worker {
    spawn(addr, token, Some(model), None, state, name, memory_gib)
}

fn forward_on_thread(
    model: Arc<Model>,
    experts: Arc<dyn RoutedExperts>,
    tokens: Vec<u32>,
) -> Result<Vec<f32>, ForwardError> {
    std::thread::spawn(move || {
        let mut cache = model.new_cache(CacheType::F32, 64);
        let mut ws = Workspace::default();
        model
            .forward(&tokens, &mut cache, experts.as_ref(), &mut ws, Logits::All)
            .map(|l| l.to_vec())
    })
    .join()
    .expect("forward thread")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax_rows(l: &[f32], vocab: usize) -> Vec<usize> {
    l.chunks(vocab)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap()
        })
        .collect()
}

#[test]
fn two_workers_serve_the_experts_survive_a_loss_and_refuse_a_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let file = Arc::new(ModelFile::open(&path).unwrap());
    let model = Arc::new(file.load_model().unwrap());
    let local: Arc<dyn RoutedExperts> = Arc::new(file.load_experts(&ExpertFilter::All).unwrap());
    let vocab = model.cfg.vocab_size;
    let tokens: Vec<u32> = vec![1, 17, 300, 42, 7, 999, 5, 64];
    let want = forward_on_thread(model.clone(), local, tokens.clone()).unwrap();

    let (rt, cluster) = start_cluster(
        dir.path(),
        &file,
        &model.cfg,
        2,
        Duration::from_secs(2),
        Duration::from_secs(3),
        true,
    );
    let addr = cluster.addr.to_string();
    let token = cluster.token.to_string();

    // A worker with a wrong secret is refused and exits with an error.
    let mut bad_token: proto::trust::JoinToken = token.parse().unwrap();
    bad_token.secret[0] ^= 1;
    let out = Command::new(worker_bin())
        .args([
            "--coordinator",
            &addr,
            "--name",
            "intruder",
            "--threads",
            "1",
        ])
        .args(["--memory", "1", "--join-token", &bad_token.to_string()])
        .arg("--model")
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("intruder"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");

    let w1 = spawn_worker(
        &addr,
        Some(&token),
        &path,
        &dir.path().join("w1"),
        "w1",
        HALF,
    );
    let w2 = spawn_worker(
        &addr,
        Some(&token),
        &path,
        &dir.path().join("w2"),
        "w2",
        HALF,
    );
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "the cluster never became ready: {:?}",
        cluster.status()
    );
    let st = cluster.status();
    assert!(st.all_placed && st.all_loaded);
    assert_eq!(st.workers.len(), 2);
    let held: u64 = st.workers.iter().map(|w| w.experts_held).sum();
    assert_eq!(held, 4 * 16, "every expert of the 4 MoE layers once");
    assert!(st.workers.iter().all(|w| w.experts_held == 32), "{st:?}");

    // Through the cluster: the same logits as in one process (f32 on the wire; the only
    // difference is the order of the additions).
    let experts: Arc<dyn RoutedExperts> = cluster.experts();
    let got = forward_on_thread(model.clone(), experts.clone(), tokens.clone()).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "cluster logits differ from local by {d}");
    assert_eq!(argmax_rows(&got, vocab), argmax_rows(&want, vocab));
    let st = cluster.status();
    assert!(st.workers.iter().all(|w| w.requests_served > 0), "{st:?}");

    // bf16 on the wire (the default): the hidden vectors and partial sums are rounded to 8
    // significant bits, a relative error of at most 2^-9 each way; on this model that moves
    // the logits by less than 0.05 and keeps every greedy token.
    let bf16 = {
        let _g = rt.enter();
        cluster.experts_with(Dtype::Bf16)
    };
    let got16 = forward_on_thread(model.clone(), bf16, tokens.clone()).unwrap();
    let d16 = max_diff(&got16, &want);
    eprintln!("bf16 on the wire: max logit difference {d16}");
    assert!(
        d16 > 0.0 && d16 < 0.05,
        "bf16 logits differ from local by {d16}"
    );
    assert_eq!(argmax_rows(&got16, vocab), argmax_rows(&want, vocab));

    // Lose a worker: the next forward fails within a few seconds and names the experts, and
    // the status shows the gap.
    drop(w2);
    expect_gap(&cluster, &model, &experts, &tokens, "w2");

    // It comes back (its identity is on disk: no token needed) and serving resumes.
    let _w2 = spawn_worker(&addr, None, &path, &dir.path().join("w2"), "w2", HALF);
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "serving never resumed: {:?}",
        cluster.status()
    );
    let again = forward_on_thread(model.clone(), experts.clone(), tokens.clone()).unwrap();
    assert!(max_diff(&again, &want) < 1e-4);

    // Now w1 is lost for good; a new worker with room takes over its experts.
    drop(w1);
    expect_gap(&cluster, &model, &experts, &tokens, "w1");
    let _w3 = spawn_worker(
        &addr,
        Some(&token),
        &path,
        &dir.path().join("w3"),
        "w3",
        "1",
    );
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "the new worker never took over: {:?}",
        cluster.status()
    );
    let st = cluster.status();
    let w3 = st.workers.iter().find(|w| w.name == "w3").unwrap();
    assert_eq!(w3.experts_held, 32, "{st:?}");
    let again = forward_on_thread(model.clone(), experts, tokens).unwrap();
    assert!(max_diff(&again, &want) < 1e-4);
}

/// After `name` died: a forward fails within a few seconds naming experts, and the status
/// shows the worker offline and the cluster not serving.
fn expect_gap(
    cluster: &Cluster,
    model: &Arc<Model>,
    experts: &Arc<dyn RoutedExperts>,
    tokens: &[u32],
    name: &str,
) {
    let t0 = Instant::now();
    let err = loop {
        match forward_on_thread(model.clone(), experts.clone(), tokens.to_vec()) {
            Err(e) => break e,
            Ok(_) => {
                // The very first request after the loss may still have gone through.
                assert!(t0.elapsed() < Duration::from_secs(10), "loss never noticed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(t0.elapsed() < Duration::from_secs(10));
    let ForwardError::Experts(ExpertError::Unavailable { detail, .. }) = &err else {
        panic!("{err:?}")
    };
    assert!(detail.contains("experts"), "{detail}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.is_serving() {
        assert!(Instant::now() < deadline, "status never showed the gap");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = cluster.status();
    assert!(!st.all_loaded);
    let lost = st.workers.iter().find(|w| w.name == name).unwrap();
    assert_eq!(lost.state, proto::control::WorkerState::Offline, "{st:?}");
}

/// Experts of the tiny model as stored (BF16): gate, up and down of 64 x 512.
const EXPERT_BYTES: u64 = 196_608;

#[test]
fn a_worker_without_the_model_streams_its_experts_then_reuses_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let file = Arc::new(ModelFile::open(&path).unwrap());
    let model = Arc::new(file.load_model().unwrap());
    assert!(file
        .expert_layout()
        .unwrap()
        .iter()
        .all(|&(_, _, b)| b == EXPERT_BYTES));
    let local: Arc<dyn RoutedExperts> = Arc::new(file.load_experts(&ExpertFilter::All).unwrap());
    let tokens: Vec<u32> = vec![3, 77, 512, 9, 1000, 2];
    let want = forward_on_thread(model.clone(), local, tokens.clone()).unwrap();

    let (rt, cluster) = start_cluster(
        dir.path(),
        &file,
        &model.cfg,
        2,
        Duration::from_secs(2),
        Duration::from_secs(3),
        true,
    );
    let addr = cluster.addr.to_string();
    let token = cluster.token.to_string();
    let cache = dir.path().join("cache");

    let _w1 = spawn_worker(
        &addr,
        Some(&token),
        &path,
        &dir.path().join("w1"),
        "w1",
        HALF,
    );
    let w2 = spawn(
        &addr,
        Some(&token),
        None,
        Some(&cache),
        &dir.path().join("w2"),
        "w2",
        HALF,
    );
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "the cluster never became ready: {:?}",
        cluster.status()
    );
    let st = cluster.status();
    assert!(st.workers.iter().all(|w| w.experts_held == 32), "{st:?}");

    // w2's 32 experts came over the control plane, each byte once.
    let served = cluster.weight_bytes_served();
    assert_eq!(served, 32 * EXPERT_BYTES);
    let fp_dir = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut files = 0;
    for t in std::fs::read_dir(&fp_dir).unwrap() {
        for f in std::fs::read_dir(t.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            assert_ne!(
                f.extension().and_then(|e| e.to_str()),
                Some("part"),
                "{f:?}"
            );
            files += 1;
        }
    }
    assert_eq!(files, 32 * 3, "one file per expert and matrix");

    // Through the cluster: the same logits as in one process.
    let experts: Arc<dyn RoutedExperts> = cluster.experts();
    let got = forward_on_thread(model.clone(), experts.clone(), tokens.clone()).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "cluster logits differ from local by {d}");

    // FetchWeights serves routed-expert tensors of this model to workers only, within bounds.
    rt.block_on(fetch_refusals(&addr, &dir.path().join("w2"), &file));
    assert_eq!(cluster.weight_bytes_served(), served);

    // Restart w2: its experts come from its cache, nothing is fetched again.
    drop(w2);
    expect_gap(&cluster, &model, &experts, &tokens, "w2");
    let _w2 = spawn(
        &addr,
        None,
        None,
        Some(&cache),
        &dir.path().join("w2"),
        "w2",
        HALF,
    );
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "serving never resumed: {:?}",
        cluster.status()
    );
    assert_eq!(
        cluster.weight_bytes_served(),
        served,
        "experts fetched again"
    );
    let again = forward_on_thread(model.clone(), experts, tokens).unwrap();
    assert!(max_diff(&again, &want) < 1e-4);
}

async fn fetch_refusals(addr: &str, worker_state: &Path, file: &ModelFile) {
    use proto::control::{Client, FetchRequest};
    use proto::trust::{self, Identity, Trust};

    let id = Identity::load(worker_state).unwrap();
    let tls = trust::client_config(Some(&id), Trust::Ca(id.ca_pem.clone())).unwrap();
    let mut client = Client::new(trust::connect(addr, Arc::new(tls)).await.unwrap());
    let gate = "blk.1.ffn_gate_exps.weight";
    let size = EXPERT_BYTES / 3 * 16;
    let req = |tensor: &str, offset: u64, length: u64| FetchRequest {
        model_fingerprint: file.fingerprint(),
        tensor: tensor.into(),
        offset,
        length,
    };
    let code = |r: Result<_, proto::control::RpcError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.code(),
    };
    use tonic::Code;
    assert_eq!(
        code(client.fetch_weights(req("token_embd.weight", 0, 64)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            client
                .fetch_weights(req("blk.1.ffn_gate_shexp.weight", 0, 64))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(client.fetch_weights(req(gate, size - 10, 20)).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(client.fetch_weights(req(gate, 0, 300 << 20)).await),
        Code::InvalidArgument
    );
    // The whole tensor holds the other worker's experts too: not this worker's to fetch.
    assert_eq!(
        code(client.fetch_weights(req(gate, 0, size)).await),
        Code::PermissionDenied
    );
    let mut wrong = req(gate, 0, 64);
    wrong.model_fingerprint = "fnv64:0000000000000000".into();
    assert_eq!(
        code(client.fetch_weights(wrong).await),
        Code::FailedPrecondition
    );

    // No client certificate: refused.
    let tls = trust::client_config(None, Trust::Ca(id.ca_pem.clone())).unwrap();
    let mut anon = Client::new(trust::connect(addr, Arc::new(tls)).await.unwrap());
    assert_eq!(
        code(anon.fetch_weights(req(gate, 0, 64)).await),
        Code::Unauthenticated
    );
}

/// A worker computing its experts on a GPU (lavapipe here, through wgpu) gives the same logits
/// as the CPU in one process. Skips with one line when there is no adapter, unless
/// `REQUIRE_GPU_TESTS` is set (CI), where a missing adapter fails.
#[test]
fn a_gpu_worker_serves_the_same_logits() {
    let software = engine::gpu::list_adapters()
        .into_iter()
        .find(|a| a.is_software || a.device_type.to_lowercase().contains("cpu"));
    let Some(adapter) = software.or_else(|| engine::gpu::list_adapters().into_iter().next()) else {
        assert!(
            std::env::var_os("REQUIRE_GPU_TESTS").is_none(),
            "REQUIRE_GPU_TESTS is set but no GPU adapter was found"
        );
        eprintln!("skipping a_gpu_worker_serves_the_same_logits: no GPU adapter");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let file = Arc::new(ModelFile::open(&path).unwrap());
    let model = Arc::new(file.load_model().unwrap());
    let local: Arc<dyn RoutedExperts> = Arc::new(file.load_experts(&ExpertFilter::All).unwrap());
    let tokens: Vec<u32> = vec![1, 17, 300, 42, 7, 999, 5, 64];
    let want = forward_on_thread(model.clone(), local, tokens.clone()).unwrap();
    let (rt, cluster) = start_cluster(
        dir.path(),
        &file,
        &model.cfg,
        1,
        Duration::from_secs(10),
        Duration::from_secs(20),
        false,
    );
    let mut cmd = Command::new(worker_bin());
    cmd.args(["--coordinator", &cluster.addr.to_string(), "--name", "gpu"])
        .args(["--join-token", &cluster.token.to_string(), "--threads", "1"])
        .args(["--backend", "wgpu", "--gpu", &adapter.index.to_string()])
        .args(["--memory", "1"])
        .arg("--model")
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("gpu"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _w = Worker(cmd.spawn().unwrap());
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(120))),
        "the GPU worker never became ready: {:?}",
        cluster.status()
    );
    let st = cluster.status();
    assert_eq!(
        st.workers[0].backend,
        adapter.backend.to_lowercase(),
        "{st:?}"
    );
    let got = forward_on_thread(model, cluster.experts(), tokens).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-3, "GPU worker logits differ from the CPU by {d}");
}
