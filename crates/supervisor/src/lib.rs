//! stub
pub mod admin;
pub mod api;
pub mod control;
pub mod stats;
