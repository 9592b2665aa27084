//! Every end-to-end test that neither measures the process's memory nor captures its logs, in one
//! binary: one link of the host instead of one per file, and one build of the test components.
//! Tests that read the test process's RSS share `memory`, and those that install the global log
//! capture share `sandbox`, so no test here is disturbed by them.
//! Run one file with `cargo test -p plugbus-tests --test e2e -- FILE::` (e.g. `delivery::`).

mod bad_plugins;
mod casetest;
mod cli;
mod crash;
mod dashboard;
mod dashboard_browser;
mod delivery;
mod dev;
mod disk_full;
mod dlq_debug;
mod faults;
mod hostile_api;
mod hostile_identity;
mod hostile_sandbox;
mod http_ingress;
mod nats;
mod operate;
mod outbound;
mod outputs;
mod pipeline;
mod reload;
mod replay;
mod request_reply;
mod service;
mod tracing_otlp;
