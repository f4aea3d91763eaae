//! Sink: partition, batch, encode, write.

pub mod batch;
pub mod encode;
pub mod partition;
pub mod write;
