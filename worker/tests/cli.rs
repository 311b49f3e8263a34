//! The `worker` binary's command line: bad input is refused with a clear message and exit
//! code 1, before anything touches the network.

use std::process::Command;

/// Runs `worker` with `args` plus a fresh `--state-dir` (given `{dir}` in an argument, it is
/// replaced by that directory), checks it exits with 1, and returns its stderr.
fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args.iter().map(|a| a.replace("{dir}", d)))
        .args(["--state-dir", d])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_malformed_join_token_is_refused() {
    let err = refused(&[
        "--coordinator",
        "127.0.0.1:9",
        "--join-token",
        "not-a-token",
    ]);
    assert!(err.contains("--join-token"), "{err}");
}

#[test]
fn a_missing_model_file_is_refused() {
    let err = refused(&[
        "--coordinator",
        "127.0.0.1:9",
        "--model",
        "{dir}/missing.gguf",
    ]);
    assert!(err.contains("missing.gguf"), "{err}");
}

#[test]
fn without_identity_or_token_it_says_how_to_join() {
    let err = refused(&[
        "--coordinator",
        "127.0.0.1:9",
        "--memory",
        "1",
        "--backend",
        "cpu",
    ]);
    assert!(err.contains("has not joined"), "{err}");
}
