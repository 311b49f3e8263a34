//! `cluster status`: the cluster at a glance, as a table or as JSON, once or every second.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use proto::control::{Activations, ClusterStatus, WorkerState, WorkerStatus};
use proto::trust::JoinToken;
use serde::Serialize;

use super::{Access, ControlArgs};

/// How often `--watch` redraws.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Join with this token (once; the identity is kept per user) instead of using the
    /// coordinator's state directory: for watching from another machine.
    #[arg(long, conflicts_with = "state_dir")]
    pub join_token: Option<JoinToken>,
    /// Print JSON instead of the table (a stable shape: snake_case fields, units in their
    /// names, a "format" version).
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until Ctrl-C (with --json: one JSON document per line).
    #[arg(long)]
    pub watch: bool,
}

pub fn run(a: StatusArgs) -> Result<ExitCode> {
    let access = match a.join_token.clone() {
        Some(t) => Access::Token(t),
        None => Access::Operator(a.control.state_dir.clone()),
    };
    let rt = super::runtime()?;
    if a.watch {
        rt.block_on(watch(&a, &access))?;
        return Ok(ExitCode::SUCCESS);
    }
    let status = rt.block_on(super::fetch_status(&a.control.coordinator, &access))?;
    if a.json {
        super::emit(&format!("{}\n", render_json(&status)))?;
    } else {
        super::emit(&render_table(&status))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Redraws every [`WATCH_INTERVAL`] until Ctrl-C; a failed fetch is shown in place of the
/// table and tried again at the next tick.
async fn watch(a: &StatusArgs, access: &Access) -> Result<()> {
    let coordinator = a.control.coordinator.as_str();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !a.json && !super::emit("\x1b[2J")? {
        return Ok(()); // clear once; each frame then overwrites in place
    }
    loop {
        let frame = async {
            tick.tick().await;
            let fetched = super::fetch_status(coordinator, access).await;
            let text = match (&fetched, a.json) {
                (Ok(s), true) => format!("{}\n", render_json_line(s)),
                (Ok(s), false) => format!(
                    "{}\nevery {}s from {coordinator}; Ctrl-C to quit\n",
                    render_table(s),
                    WATCH_INTERVAL.as_secs()
                ),
                (Err(e), true) => {
                    eprintln!("cluster status: {}", super::one_line(e));
                    return Ok(true);
                }
                (Err(e), false) => format!(
                    "cluster status: {}\nretrying every {}s; Ctrl-C to quit\n",
                    super::one_line(e),
                    WATCH_INTERVAL.as_secs()
                ),
            };
            super::emit(&if a.json { text } else { redraw(&text) })
        };
        tokio::select! {
            _ = &mut ctrl_c => break,
            open = frame => if !open? { return Ok(()) },
        }
    }
    if !a.json {
        super::emit("\n")?;
    }
    Ok(())
}

/// `text` drawn over the previous frame: cursor home, each line cleared to its end, the rest
/// of the screen cleared.
fn redraw(text: &str) -> String {
    let mut s = String::from("\x1b[H");
    for line in text.lines() {
        let _ = write!(s, "{line}\x1b[K\r\n");
    }
    s.push_str("\x1b[J");
    s
}

// ---------------------------------------------------------------------------------------------
// JSON

/// `cluster status --json`: a stable shape for scripts. Field names are snake_case and carry
/// their unit; new fields may be added, existing ones keep their meaning.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusJson {
    /// Version of this shape (1).
    pub format: u32,
    /// The model's name.
    pub model: String,
    /// Every expert has a holder in the plan.
    pub all_placed: bool,
    /// Every planned expert is loaded by a ready holder (the cluster serves).
    pub all_loaded: bool,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_second: f64,
    /// Where the coordinator runs the always-active part ("cpu (8 threads, AVX2)", "vulkan
    /// NVIDIA GeForce RTX 4090"; empty when unknown).
    pub coordinator_device: String,
    /// The activation format of quantized products: "f32", "int16" or "int8".
    pub activations: &'static str,
    /// Copies of every routed expert the plan asks for (1: no spares).
    pub copies: u32,
    /// Routed experts of the model.
    pub experts_total: u64,
    /// Of them, those served by two or more live workers (they survive the loss of one).
    pub experts_with_spare: u64,
    pub workers: Vec<WorkerJson>,
}

/// One worker in [`StatusJson`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerJson {
    pub id: u64,
    pub name: String,
    /// The address its control connection comes from (empty for the coordinator itself).
    pub address: String,
    /// Compute backend ("cpu", "vulkan", "metal", ...; empty when unknown).
    pub backend: String,
    /// The GPU's name (empty for the CPU).
    pub gpu: String,
    /// Bytes of experts assigned to it.
    pub memory_used_bytes: u64,
    /// Bytes it offered for experts.
    pub memory_total_bytes: u64,
    /// Routed experts assigned to it, over all layers (spare copies included).
    pub experts_held: u64,
    /// Of them, spare copies of experts other workers own.
    pub spares_held: u64,
    /// The MoE layers it holds experts of, ascending.
    pub layers: Vec<u32>,
    /// "joining", "loading", "ready", "draining" or "offline".
    pub state: &'static str,
    /// Progress of loading its experts, 0 to 100.
    pub load_percent: f64,
    /// Median and 99th-percentile round trip of its data-plane requests (0: none yet).
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    /// Data-plane requests it answered.
    pub requests_served: u64,
}

impl From<&ClusterStatus> for StatusJson {
    fn from(s: &ClusterStatus) -> Self {
        StatusJson {
            format: 1,
            model: s.model.clone(),
            all_placed: s.all_placed,
            all_loaded: s.all_loaded,
            tokens_per_second: s.tokens_per_second,
            coordinator_device: s.coordinator_device.clone(),
            activations: s.activations.as_str(),
            copies: s.copies,
            experts_total: s.experts,
            experts_with_spare: s.experts_with_spare,
            workers: s.workers.iter().map(WorkerJson::from).collect(),
        }
    }
}

impl From<&WorkerStatus> for WorkerJson {
    fn from(w: &WorkerStatus) -> Self {
        let mut layers = w.layers.clone();
        layers.sort_unstable();
        layers.dedup();
        WorkerJson {
            id: w.id,
            name: w.name.clone(),
            address: w.address.clone(),
            backend: w.backend.clone(),
            gpu: w.gpu.clone(),
            memory_used_bytes: w.memory_used_bytes,
            memory_total_bytes: w.memory_total_bytes,
            experts_held: w.experts_held,
            spares_held: w.spares_held,
            layers,
            state: w.state.as_str(),
            // f32 -> f64 through the decimal text, so 42.5 stays 42.5 and 33.3 stays 33.3.
            load_percent: w.load_percent.to_string().parse().unwrap_or(0.0),
            rtt_p50_us: w.rtt_p50_us,
            rtt_p99_us: w.rtt_p99_us,
            requests_served: w.requests_served,
        }
    }
}

/// Pretty JSON (two-space indent).
pub fn render_json(s: &ClusterStatus) -> String {
    serde_json::to_string_pretty(&StatusJson::from(s)).expect("status serialises")
}

/// JSON on one line (`--watch --json`).
pub fn render_json_line(s: &ClusterStatus) -> String {
    serde_json::to_string(&StatusJson::from(s)).expect("status serialises")
}

// ---------------------------------------------------------------------------------------------
// The table

/// The status as a person reads it: a header (model, whether every expert is placed and
/// loaded, throughput, workers) and one row per worker. Column widths come from the content.
pub fn render_table(s: &ClusterStatus) -> String {
    let ready = s
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .count();
    let experts = match (s.all_placed, s.all_loaded) {
        (_, true) => "every expert placed and loaded: serving",
        (true, false) => "every expert placed, not all loaded yet",
        (false, _) => "not every expert placed yet",
    };
    let mut out = String::new();
    let model = if s.model.is_empty() { "-" } else { &s.model };
    let _ = writeln!(out, "model:       {model}");
    let own = match s.coordinator_device.as_str() {
        "" => "-",
        d => d,
    };
    let acts = match s.activations {
        Activations::F32 => "exact f32",
        Activations::Int16 => "int16",
        Activations::Int8 => "int8",
    };
    let _ = writeln!(out, "coordinator: {own}, {acts} activations");
    let _ = writeln!(out, "experts:     {experts}");
    if s.copies > 1 {
        let _ = writeln!(
            out,
            "copies:      {} of each asked; {} of {} experts have a spare on a live worker",
            s.copies, s.experts_with_spare, s.experts
        );
    }
    let _ = writeln!(out, "throughput:  {:.1} tokens/s", s.tokens_per_second);
    let _ = writeln!(out, "workers:     {} ({ready} ready)", s.workers.len());
    out.push('\n');
    let header = [
        "NAME",
        "ADDRESS",
        "DEVICE",
        "MEMORY",
        "EXPERTS (LAYERS)",
        "STATE",
        "RTT P50/P99",
        "SERVED",
    ];
    let right = [false, false, false, true, false, false, true, true];
    let rows: Vec<[String; 8]> = s
        .workers
        .iter()
        .map(|w| {
            [
                w.name.clone(),
                or_dash(&w.address),
                device(w),
                memory(w.memory_used_bytes, w.memory_total_bytes),
                experts_held(w),
                state(w),
                rtt(w),
                w.requests_served.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = widths[i] - cell.chars().count();
            if right[i] {
                l.extend(std::iter::repeat_n(' ', pad));
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for r in &rows {
        line(r);
    }
    if rows.is_empty() {
        out.push_str("(no worker has said hello yet)\n");
    }
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Backend and device name, the backend left out when the name starts with it (the CPU
/// backend's device is "cpu (N threads, KERNELS)").
fn device(w: &WorkerStatus) -> String {
    if w.gpu.is_empty() {
        or_dash(&w.backend)
    } else if w.backend.is_empty() || w.gpu.starts_with(&w.backend) {
        w.gpu.clone()
    } else {
        format!("{} {}", w.backend, w.gpu)
    }
}

/// `used/total unit`, both in the unit that suits the larger.
pub fn memory(used: u64, total: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    let max = used.max(total);
    if max == 0 {
        return "-".into();
    }
    match UNITS.iter().find(|(_, size)| max >= *size) {
        Some((unit, size)) => format!(
            "{:.1}/{:.1} {unit}",
            used as f64 / *size as f64,
            total as f64 / *size as f64
        ),
        None => format!("{used}/{total} B"),
    }
}

fn experts_held(w: &WorkerStatus) -> String {
    if w.experts_held == 0 {
        return "0".into();
    }
    let spares = w.spares_held.min(w.experts_held);
    if spares == 0 {
        return format!("{} ({})", w.experts_held, layer_ranges(&w.layers));
    }
    format!(
        "{}+{spares} spare ({})",
        w.experts_held - spares,
        layer_ranges(&w.layers)
    )
}

/// Layers as compact ranges: `[1, 2, 3, 5, 7, 8]` → `1-3,5,7-8`.
pub fn layer_ranges(layers: &[u32]) -> String {
    let mut l = layers.to_vec();
    l.sort_unstable();
    l.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < l.len() {
        let mut j = i;
        while j + 1 < l.len() && l[j + 1] == l[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            let _ = write!(out, "{}", l[i]);
        } else {
            let _ = write!(out, "{}-{}", l[i], l[j]);
        }
        i = j + 1;
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

fn state(w: &WorkerStatus) -> String {
    match w.state {
        WorkerState::Loading => format!("loading {:.0}%", w.load_percent.floor()),
        s => s.as_str().to_string(),
    }
}

fn rtt(w: &WorkerStatus) -> String {
    if w.rtt_p50_us == 0 && w.rtt_p99_us == 0 {
        return "-".into();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!("{:.2}/{:.2} ms", ms(w.rtt_p50_us), ms(w.rtt_p99_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A cluster of three workers: one ready on a GPU, one loading on the CPU, one offline.
    fn example() -> ClusterStatus {
        ClusterStatus {
            model: "DeepSeek-R1".into(),
            all_placed: true,
            all_loaded: false,
            tokens_per_second: 7.25,
            coordinator_device: "vulkan NVIDIA GeForce RTX 4090".into(),
            activations: Activations::Int8,
            copies: 2,
            experts: 14848,
            experts_with_spare: 13000,
            workers: vec![
                WorkerStatus {
                    id: 1,
                    name: "gpu-box".into(),
                    address: "192.168.1.20:51234".into(),
                    backend: "vulkan".into(),
                    gpu: "NVIDIA GeForce RTX 4090".into(),
                    memory_used_bytes: 21_474_836_480 - (1 << 28),
                    memory_total_bytes: 24 << 30,
                    experts_held: 1856,
                    spares_held: 0,
                    layers: (3..=31).collect(),
                    state: WorkerState::Ready,
                    load_percent: 100.0,
                    rtt_p50_us: 1234,
                    rtt_p99_us: 5678,
                    requests_served: 123_456,
                },
                WorkerStatus {
                    id: 2,
                    name: "old-laptop".into(),
                    address: "192.168.1.21:40002".into(),
                    backend: "cpu".into(),
                    gpu: "cpu (8 threads)".into(),
                    memory_used_bytes: 900 << 20,
                    memory_total_bytes: 1 << 30,
                    experts_held: 64,
                    spares_held: 16,
                    layers: vec![32, 33, 34, 40, 45, 46],
                    state: WorkerState::Loading,
                    load_percent: 42.7,
                    rtt_p50_us: 0,
                    rtt_p99_us: 0,
                    requests_served: 0,
                },
                WorkerStatus {
                    id: 3,
                    name: "mac-mini".into(),
                    address: "192.168.1.22:40003".into(),
                    backend: "metal".into(),
                    gpu: "Apple M2".into(),
                    memory_used_bytes: 0,
                    memory_total_bytes: 16 << 30,
                    experts_held: 0,
                    spares_held: 0,
                    layers: vec![],
                    state: WorkerState::Offline,
                    load_percent: 0.0,
                    rtt_p50_us: 800,
                    rtt_p99_us: 15_000,
                    requests_served: 42,
                },
            ],
        }
    }

    /// Compares `actual` with the committed file `snapshots/<name>`; `UPDATE_SNAPSHOTS=1`
    /// rewrites the file instead.
    fn check_snapshot(name: &str, actual: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/cli/snapshots")
            .join(name);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with UPDATE_SNAPSHOTS=1 to create it",
                path.display()
            )
        });
        if expected == actual {
            return;
        }
        let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
        let mut diff = String::new();
        for i in 0..e.len().max(a.len()) {
            match (e.get(i), a.get(i)) {
                (Some(x), Some(y)) if x == y => {
                    let _ = writeln!(diff, " {x}");
                }
                (x, y) => {
                    if let Some(x) = x {
                        let _ = writeln!(diff, "-{x}");
                    }
                    if let Some(y) = y {
                        let _ = writeln!(diff, "+{y}");
                    }
                }
            }
        }
        panic!(
            "{} differs (- expected, + actual; UPDATE_SNAPSHOTS=1 accepts the new output):\n{diff}",
            path.display()
        );
    }

    #[test]
    fn table_snapshot() {
        check_snapshot("status_table.txt", &render_table(&example()));
    }

    #[test]
    fn json_snapshot() {
        check_snapshot("status.json", &format!("{}\n", render_json(&example())));
    }

    #[test]
    fn empty_cluster_snapshot() {
        let s = ClusterStatus {
            model: String::new(),
            all_placed: false,
            all_loaded: false,
            workers: vec![],
            tokens_per_second: 0.0,
            coordinator_device: String::new(),
            activations: Activations::F32,
            copies: 1,
            experts: 0,
            experts_with_spare: 0,
        };
        check_snapshot("status_empty.txt", &render_table(&s));
    }

    #[test]
    fn table_columns_line_up_whatever_the_content() {
        let mut s = example();
        s.workers[0].name = "a-much-longer-worker-name".into();
        s.workers[1].requests_served = 9_999_999_999;
        let table = render_table(&s);
        let lines: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("NAME"))
            .collect();
        assert_eq!(lines.len(), 4);
        // Every column starts at the same offset in every row.
        let col = |l: &str, text: &str| l.find(text).unwrap();
        assert_eq!(col(lines[0], "ADDRESS"), col(lines[1], "192.168.1.20"));
        assert_eq!(col(lines[0], "ADDRESS"), col(lines[2], "192.168.1.21"));
        // Right-aligned columns end together; nothing trails.
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
        assert_eq!(lines[0].len(), lines[2].len(), "{table}");
    }

    #[test]
    fn units_ranges_and_states() {
        assert_eq!(memory(0, 0), "-");
        assert_eq!(memory(512, 1000), "512/1000 B");
        assert_eq!(memory(3 << 20, 6 << 20), "3.0/6.0 MiB");
        assert_eq!(memory(1 << 29, 3 << 30), "0.5/3.0 GiB");
        assert_eq!(memory(5 << 40, 4 << 40), "5.0/4.0 TiB");
        assert_eq!(layer_ranges(&[]), "-");
        assert_eq!(layer_ranges(&[7]), "7");
        assert_eq!(layer_ranges(&[5, 1, 2, 3, 7, 8, 3]), "1-3,5,7-8");
        let mut w = example().workers[1].clone();
        for (st, pct, want) in [
            (WorkerState::Joining, 0.0, "joining"),
            (WorkerState::Loading, 99.9, "loading 99%"),
            (WorkerState::Ready, 100.0, "ready"),
            (WorkerState::Draining, 100.0, "draining"),
            (WorkerState::Offline, 0.0, "offline"),
        ] {
            w.state = st;
            w.load_percent = pct;
            assert_eq!(state(&w), want);
            assert_eq!(WorkerJson::from(&w).state, st.as_str());
        }
    }

    #[test]
    fn redraw_overwrites_in_place() {
        assert_eq!(redraw("a\nbc\n"), "\x1b[Ha\x1b[K\r\nbc\x1b[K\r\n\x1b[J");
    }
}
