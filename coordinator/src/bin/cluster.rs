//! `cluster`: watch and steer a running cluster (`cluster status`, `cluster drain`,
//! `cluster chat`). The logic lives in `coordinator::cli`.

fn main() -> std::process::ExitCode {
    coordinator::cli::main()
}
