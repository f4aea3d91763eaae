//! Sources: where the list of delivery files to process comes from.

pub mod backfill;
pub mod cwl;
pub mod kinesis;
pub mod lease;
pub mod local;
pub mod notification;
pub mod sqs;
