//! The sandbox's tests and the contract-version tests: both capture the host's logs (a global
//! subscriber, once per binary), so they share a binary apart from the others in `e2e`.

mod contract;
mod sandbox;
