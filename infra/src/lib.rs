//! Shared I/O plumbing of Sluice's processes: the Postgres store ([`store`]) and Kafka
//! client helpers ([`kafka`]). Each process keeps the queries only it runs.

#![forbid(unsafe_code)]

pub mod config_file;
pub mod kafka;
pub mod metrics;
pub mod process;
pub mod secrets;
pub mod store;
pub mod telemetry;
