//! Helpers shared by the property tests and the cargo-fuzz targets.

pub mod canonical;
