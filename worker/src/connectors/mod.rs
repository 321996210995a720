//! Connectors: the `generator` source and the `postgres` destination.

pub mod generator;
pub mod postgres;
