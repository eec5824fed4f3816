//! Control socket (placeholder until branch `admin` lands).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::api::ApiClient;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("could not bind the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn default_control_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("roundhouse.sock"),
        None => PathBuf::from(format!(
            "/tmp/roundhouse-{}.sock",
            nix::unistd::Uid::current()
        )),
    }
}

pub fn bind_control(path: &Path) -> Result<UnixListener, ControlError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(l)
}

pub async fn serve_control(_listener: tokio::net::UnixListener, _api: ApiClient) {}
