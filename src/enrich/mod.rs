//! Enrichment: fields added to each event before transforms see it.

pub mod geo;
pub mod live;
pub mod members;
pub mod tables;
