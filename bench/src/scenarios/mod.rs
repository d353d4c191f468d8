//! The seven scenarios of `BENCHMARKS.md`, and the soak (`SOAK.md`).

pub mod churn;
pub mod footprint;
pub mod hit_path;
pub mod lease;
pub mod rollover;
pub mod soak;
pub mod stampede;
pub mod wakeup;
