//! Measurement harness for the `bench` command: memory bandwidth and kernel throughput.
