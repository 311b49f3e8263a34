//! `coordinator`: the coordinator daemon and its one-machine `generate` command.
fn main() {}
