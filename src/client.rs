//! Control client (placeholder until branch `admin` lands).
use std::path::Path;

pub fn status(_control: &Path, _json: bool) -> i32 {
    eprintln!("roundhouse: not implemented yet");
    1
}
pub fn reload(_control: &Path) -> i32 {
    status(_control, false)
}
pub fn scale(control: &Path, _workers: u32) -> i32 {
    status(control, false)
}
pub fn send(control: &Path, _to: &str, _json: &str) -> i32 {
    status(control, false)
}
pub fn stop(control: &Path) -> i32 {
    status(control, false)
}
