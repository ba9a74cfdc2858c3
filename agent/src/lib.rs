//! tracer-agent as a library: the pipeline stages, in the order data flows through them.
//! The `tracer-agent` binary (main.rs) wires them to the kernel probes; benchmarks and fuzz
//! targets drive them directly.
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod dump;
pub mod export;
pub mod field;
pub mod http1;
pub mod http2;
pub mod link;
pub mod metrics;
pub mod pipeline;
pub mod procfs_sockets;
pub mod protocols;
pub mod resource;
pub mod sample;
pub mod select;
pub mod spans;
pub mod streams;
pub mod tls;
pub mod tracecontext;
