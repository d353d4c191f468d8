//! The six scenarios of `BENCHMARKS.md`.

pub mod footprint;
pub mod hit_path;
pub mod lease;
pub mod rollover;
pub mod stampede;
pub mod wakeup;
