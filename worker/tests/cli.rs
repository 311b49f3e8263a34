//! The `worker` binary's command line: bad input is refused with a clear message and exit
//! code 1, before anything touches the network.

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn a_malformed_join_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker()
        .args([
            "--coordinator",
            "127.0.0.1:9",
            "--join-token",
            "not-a-token",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join-token"), "{err}");
}

#[test]
fn a_missing_model_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker()
        .args(["--coordinator", "127.0.0.1:9", "--model"])
        .arg(dir.path().join("missing.gguf"))
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.gguf"), "{err}");
}

#[test]
fn without_identity_or_token_it_says_how_to_join() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker()
        .args(["--coordinator", "127.0.0.1:9", "--memory", "1"])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has not joined"), "{err}");
}
