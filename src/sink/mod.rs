//! Sink: partition, batch, encode, write.

pub mod batch;
pub mod budget;
pub mod columnar;
pub mod encode;
pub mod flat;
pub mod format;
pub mod kinesis;
pub mod ocsf;
pub mod partition;
pub mod write;
