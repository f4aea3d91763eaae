//! Sink: partition, batch, encode, write.

pub mod batch;
pub mod encode;
pub mod kinesis;
pub mod partition;
pub mod write;
